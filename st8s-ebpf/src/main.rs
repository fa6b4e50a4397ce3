//! st8s kernel programs.
//!
//! - `st8s_uplink_xdp` (XDP, node uplink): forwards a flow owned by another node straight back out
//!   of the uplink (`XDP_TX`) with only the Ethernet addresses rewritten; everything else passes.
//! - `st8s_uplink_tc` (TC ingress, node uplink): delivers steered packets to the backend pod on
//!   this node (DNAT + `bpf_redirect_neigh`, so iptables never sees them); forwards remote flows
//!   itself when XDP is not attached.
//! - `st8s_pod_tc` (TC ingress, the interface the pods hang off): rewrites backend replies to the
//!   address and port the client sent to and sends them straight out of the uplink.
//! - `st8s_sock_*` (cgroup v2 socket hooks at the node's cgroup root): clients on the node itself,
//!   its processes and its pods, steered where they name the address (connect, sendmsg), and
//!   shown that address back (recvmsg, getpeername).
//! - `st8s_xdp_pass`: `XDP_PASS`, for the switch side of veth uplinks in the lab.
#![no_std]
#![no_main]
#![feature(asm_experimental_arch)]

use aya_ebpf::{
    bindings::{__sk_buff, bpf_sock_addr, xdp_action, TC_ACT_OK, TC_ACT_REDIRECT, TC_ACT_SHOT},
    helpers::{
        bpf_ktime_get_ns,
        generated::{
            bpf_clone_redirect, bpf_csum_update, bpf_get_socket_cookie, bpf_redirect, bpf_redirect_neigh,
            bpf_redirect_peer, bpf_skb_load_bytes,
        },
    },
    macros::{cgroup_sock_addr, classifier, map, xdp},
    maps::{Array, HashMap, LruHashMap, PerCpuArray, RingBuf},
    programs::{SockAddrContext, TcContext, XdpContext},
    EbpfContext as _,
};
use st8s_common::{
    flow_hash, flow_hash6, port_index, socket_hash, word_info_index, word_slot, Addr6, Backend, Config,
    Counters, Discovery, DiscoveryPodKey, DiscoveryPodKey6, Event, FlowKey, FlowKey6, FlowValue, FragKey,
    FragKey6, FragValue, MacKey, MaglevRow, MonitorCtl, NodeInfo, PodLink, PortInfo, PortKey, RevNatKey,
    RevNatKey6, RevNatValue, RevNatValue6, SockRevNatKey, SockRevNatKey6, SockRevNatValue, SockRevNatValue6,
    BACKEND_DRAINING, BACKEND_LOCAL, BACKEND_VACANT, BANKS, CONFIG_PREFER_LOCAL, EVENTS_BYTES,
    EVENT_ANNOUNCED, EVENT_DISCOVERED, EVENT_DROP_ERROR, EVENT_DROP_NO_LOCAL_BACKEND, EVENT_FORWARDED,
    EVENT_FRAG_INVALID, EVENT_FRAG_UNTRACKED, EVENT_ICMP_ERROR, EVENT_LOCAL, EVENT_PASSED, EVENT_REPLIED,
    EVENT_SNAP, EVENT_SOCKET_LOCAL, EVENT_SOCKET_REMOTE, EVENT_UNTRUSTED_PEER, FLOW_LOCAL, FLOW_REMOTE,
    FRAG_TIMEOUT_NS, GLOBAL_COUNTER_SLOT, MAGLEV_SIZE, MAX_BACKENDS, MAX_DISCOVERY, MAX_FLOWS, MAX_FRAGS,
    MAX_NODES, MAX_PORTS, PORT_INDEX_ENTRIES, PORT_LOCAL_DRAINING, PROTO_TCP, PROTO_UDP,
};

#[map]
static ST8S_CONFIG: Array<Config> = Array::with_max_entries(1, 0);
/// The agent's registry of steered ports (inspect and restarts read it); the packet path reads
/// `ST8S_PORT_INDEX` and `ST8S_PORT_INFO`.
#[map]
#[expect(
    dead_code,
    reason = "written and read by the agent only; kept so it is created and pinned"
)]
static ST8S_PORTS: HashMap<PortKey, PortInfo> = HashMap::with_max_entries(MAX_PORTS, 0);
#[map]
static ST8S_BACKENDS: Array<Backend> = Array::with_max_entries(MAX_PORTS * BANKS * MAX_BACKENDS, 0);
#[map]
static ST8S_MAGLEV: Array<MaglevRow> = Array::with_max_entries(MAX_PORTS * BANKS, 0);
#[map]
static ST8S_PORT_INDEX: Array<u32> = Array::with_max_entries(PORT_INDEX_ENTRIES, 0);
#[map]
static ST8S_PORT_INFO: Array<PortInfo> = Array::with_max_entries(MAX_PORTS * BANKS, 0);
#[map]
static ST8S_NODES: HashMap<u32, NodeInfo> = HashMap::with_max_entries(MAX_NODES, 0);
#[map]
static ST8S_PEER_MACS: HashMap<MacKey, u32> = HashMap::with_max_entries(MAX_NODES, 0);
#[map]
static ST8S_FLOWS: LruHashMap<FlowKey, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static ST8S_REVNAT: LruHashMap<RevNatKey, RevNatValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static ST8S_COUNTERS: PerCpuArray<Counters> = PerCpuArray::with_max_entries(MAX_PORTS + 1, 0);
/// Discovery ports of this node's pods, by hostPort (uplink side).
#[map]
static ST8S_DISCOVERY: HashMap<u32, Discovery> = HashMap::with_max_entries(MAX_DISCOVERY, 0);
/// The same, by the pod's address and containerPort (pod side).
#[map]
static ST8S_DISCOVERY_PODS: HashMap<DiscoveryPodKey, Discovery> = HashMap::with_max_entries(MAX_DISCOVERY, 0);
/// Sockets on this node that socket-level steering sent to a backend: how to show the
/// application the address it asked for.
#[map]
static ST8S_SOCK_REVNAT: LruHashMap<SockRevNatKey, SockRevNatValue> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);
/// Datagrams in fragments whose first fragment st8s steered: the ports the later fragments lack.
#[map]
static ST8S_FRAGS: LruHashMap<FragKey, FragValue> = LruHashMap::with_max_entries(MAX_FRAGS, 0);
/// The IPv6 counterparts: the nodes' IPv6 addresses, IPv6 flows, reply translations and
/// fragment trains. A flow's backend is still named by its node's IPv4 address (`FlowValue`),
/// so both families share the ports, backends and Maglev rows.
#[map]
static ST8S_NODES6: HashMap<Addr6, NodeInfo> = HashMap::with_max_entries(MAX_NODES, 0);
#[map]
static ST8S_FLOWS6: LruHashMap<FlowKey6, FlowValue> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static ST8S_REVNAT6: LruHashMap<RevNatKey6, RevNatValue6> = LruHashMap::with_max_entries(MAX_FLOWS, 0);
#[map]
static ST8S_FRAGS6: LruHashMap<FragKey6, FragValue> = LruHashMap::with_max_entries(MAX_FRAGS, 0);
#[map]
static ST8S_SOCK_REVNAT6: LruHashMap<SockRevNatKey6, SockRevNatValue6> =
    LruHashMap::with_max_entries(MAX_FLOWS, 0);
/// Discovery pods by MAC and containerPort (pod side, IPv6: their multicast comes from
/// link-local addresses).
#[map]
static ST8S_DISCOVERY_PODS6: HashMap<DiscoveryPodKey6, Discovery> =
    HashMap::with_max_entries(MAX_DISCOVERY, 0);
/// By a port's counter slot: its local backend pod's own link (see `PodLink`).
#[map]
static ST8S_POD_LINKS: Array<PodLink> = Array::with_max_entries(MAX_PORTS, 0);
/// Whether `st8s monitor` listens; the agent never writes it.
#[map]
static ST8S_MONITOR: Array<MonitorCtl> = Array::with_max_entries(1, 0);
/// The steering decisions `st8s monitor` streams, written only while it listens.
#[map]
static ST8S_EVENTS: RingBuf = RingBuf::with_byte_size(EVENTS_BYTES, 0);

const ETH_HLEN: usize = 14;
const ETH_P_IP: u16 = 0x0800;
const IPV4_HLEN: usize = 20;
const L4_OFF: usize = ETH_HLEN + IPV4_HLEN;
const IP_CSUM_OFF: usize = ETH_HLEN + 10;
const IP_SRC_OFF: usize = ETH_HLEN + 12;
const IP_DST_OFF: usize = ETH_HLEN + 16;
const TCP_HLEN: usize = 20;
const UDP_HLEN: usize = 8;
/// Enough linear bytes for every header the programs read.
const PARSE_LEN: usize = L4_OFF + TCP_HLEN;

const ETH_P_IPV6: u16 = 0x86dd;
const IPV6_HLEN: usize = 40;
const IP6_SRC_OFF: usize = ETH_HLEN + 8;
const IP6_DST_OFF: usize = ETH_HLEN + 24;
/// An IPv6 TCP/UDP packet without extension headers, through the TCP header.
const PARSE_LEN6: usize = ETH_HLEN + IPV6_HLEN + TCP_HLEN;
/// Extension headers walked before the TCP or UDP header at most (Cilium's bound).
const MAX_EXT_HEADERS: usize = 4;

const BPF_F_PSEUDO_HDR: u64 = 0x10;
const BPF_NOEXIST: u64 = 1;
const EEXIST: i32 = 17;
const BPF_F_MARK_MANGLED_0: u64 = 0x20;

/// The headers of a TCP/UDP packet that st8s may steer, of family `F`. Addresses and ports stay
/// in network byte order, exactly as they sit in the packet.
#[derive(Clone, Copy)]
struct Packet<F: Family> {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    saddr: F::Addr,
    daddr: F::Addr,
    sport: u16,
    dport: u16,
    proto: u8,
    /// TCP flags (0 for UDP, and for a fragment after the first).
    tcp_flags: u8,
    /// Whole, or which fragment of a datagram (`FRAG_*`).
    frag: u8,
    /// The identification that ties fragments together, as in the packet (IPv4: the 16-bit IP
    /// id; IPv6: the fragment header's 32 bits).
    ip_id: u32,
    /// Where the TCP or UDP header starts (IPv6: after the extension headers).
    l4_off: usize,
}

/// A family st8s steers. The decision ([`steer`]), local delivery, the reply path and fragment
/// following are written once over it; each family says where its addresses sit, which maps
/// hold its flows, and how an address change enters the checksums.
trait Family: Copy {
    type Addr: Copy + PartialEq;
    type FlowKey: 'static;
    type RevKey: 'static;
    type RevValue: Copy + 'static;
    type FragKey: 'static;
    /// Where the source and destination addresses sit in the frame.
    const SRC_OFF: usize;
    const DST_OFF: usize;
    /// 4 or 6, as `Event::family` gives it.
    const FAMILY: u8;

    /// The address as two words, the first 8 bytes of `Addr6` first (IPv4: one word and 0), to
    /// reach the monitor's reporting subprograms in registers.
    fn words(a: Self::Addr) -> (u64, u64);

    /// This node's address in the family (IPv6: all zeros when the node has none).
    fn self_addr(cfg: &Config) -> Self::Addr;
    /// A cluster node's address (a peer's forward is still addressed to it).
    fn is_node(addr: Self::Addr) -> bool;
    /// The local backend pod's address in the family, if it has one.
    fn pod_addr(port: &PortInfo) -> Option<Self::Addr>;
    fn flows() -> &'static LruHashMap<Self::FlowKey, FlowValue>;
    /// A flow to this node's own address (the only frontend a node tracks flows for).
    fn flow_key_of(client: Self::Addr, client_port: u16, frontend_port: u16, proto: u8) -> Self::FlowKey;
    /// A packet's flow, as the client sent it.
    #[inline(always)]
    fn flow_key(pkt: &Packet<Self>) -> Self::FlowKey {
        Self::flow_key_of(pkt.saddr, pkt.sport, pkt.dport, pkt.proto)
    }
    fn flow_hash(key: &Self::FlowKey, frontend: &Self::Addr, seed: u32) -> u32;
    fn revnat() -> &'static LruHashMap<Self::RevKey, Self::RevValue>;
    fn rev_key(
        pod: Self::Addr,
        client: Self::Addr,
        pod_port: u16,
        client_port: u16,
        proto: u8,
    ) -> Self::RevKey;
    fn rev_value(frontend: Self::Addr, frontend_port: u16, slot: u16, stamp_ns: u64) -> Self::RevValue;
    fn reply(v: &Self::RevValue) -> Reply<Self::Addr>;
    fn stamp(v: &mut Self::RevValue) -> &mut u64;
    fn frags() -> &'static LruHashMap<Self::FragKey, FragValue>;
    fn frag_key(pkt: &Packet<Self>) -> Self::FragKey;
    /// Writes `new` over the address `old` at `off`, with the checksums that cover it: the IPv4
    /// header's, and, where `l4` gives the L4 checksum's offset and flags, the pseudo-header's
    /// share of that one.
    fn rewrite_addr(
        ctx: &TcContext,
        l4: Option<(usize, u64)>,
        off: usize,
        old: Self::Addr,
        new: Self::Addr,
    ) -> Result<(), i64>;
}

/// A reply translation: the frontend the client sent to, the port's counter slot, and when st8s
/// last delivered on the flow.
struct Reply<A> {
    frontend: A,
    frontend_port: u16,
    slot: u16,
    stamp_ns: u64,
}

#[derive(Clone, Copy)]
struct V4;

impl Family for V4 {
    type Addr = u32;
    type FlowKey = FlowKey;
    type RevKey = RevNatKey;
    type RevValue = RevNatValue;
    type FragKey = FragKey;
    const SRC_OFF: usize = IP_SRC_OFF;
    const DST_OFF: usize = IP_DST_OFF;
    const FAMILY: u8 = 4;

    #[inline(always)]
    fn words(a: u32) -> (u64, u64) {
        (a as u64, 0)
    }

    #[inline(always)]
    fn self_addr(cfg: &Config) -> u32 {
        cfg.self_addr_be
    }
    #[inline(always)]
    fn is_node(addr: u32) -> bool {
        // SAFETY: only existence is checked.
        unsafe { ST8S_NODES.get(addr) }.is_some()
    }
    #[inline(always)]
    fn pod_addr(port: &PortInfo) -> Option<u32> {
        Some(port.local_addr_be)
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey, FlowValue> {
        &ST8S_FLOWS
    }
    #[inline(always)]
    fn flow_key_of(client: u32, client_port: u16, frontend_port: u16, proto: u8) -> FlowKey {
        FlowKey {
            client_addr_be: client,
            client_port_be: client_port,
            frontend_port_be: frontend_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn flow_hash(key: &FlowKey, frontend: &u32, seed: u32) -> u32 {
        flow_hash(key, *frontend, seed)
    }
    #[inline(always)]
    fn revnat() -> &'static LruHashMap<RevNatKey, RevNatValue> {
        &ST8S_REVNAT
    }
    #[inline(always)]
    fn rev_key(pod: u32, client: u32, pod_port: u16, client_port: u16, proto: u8) -> RevNatKey {
        RevNatKey {
            pod_addr_be: pod,
            client_addr_be: client,
            pod_port_be: pod_port,
            client_port_be: client_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn rev_value(frontend: u32, frontend_port: u16, slot: u16, stamp_ns: u64) -> RevNatValue {
        RevNatValue {
            frontend_addr_be: frontend,
            frontend_port_be: frontend_port,
            slot,
            _pad: [0; 8],
            stamp_ns,
        }
    }
    #[inline(always)]
    fn reply(v: &RevNatValue) -> Reply<u32> {
        Reply {
            frontend: v.frontend_addr_be,
            frontend_port: v.frontend_port_be,
            slot: v.slot,
            stamp_ns: v.stamp_ns,
        }
    }
    #[inline(always)]
    fn stamp(v: &mut RevNatValue) -> &mut u64 {
        &mut v.stamp_ns
    }
    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKey, FragValue> {
        &ST8S_FRAGS
    }
    #[inline(always)]
    fn frag_key(pkt: &Packet<Self>) -> FragKey {
        FragKey {
            saddr_be: pkt.saddr,
            daddr_be: pkt.daddr,
            id_be: pkt.ip_id as u16,
            proto: pkt.proto,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        l4: Option<(usize, u64)>,
        off: usize,
        old: u32,
        new: u32,
    ) -> Result<(), i64> {
        if let Some((csum_off, flags)) = l4 {
            ctx.l4_csum_replace(csum_off, old as u64, new as u64, BPF_F_PSEUDO_HDR | flags | 4)?;
        }
        ctx.l3_csum_replace(IP_CSUM_OFF, old as u64, new as u64, 4)?;
        ctx.store(off, &new, 0)
    }
}

#[derive(Clone, Copy)]
struct V6;

impl Family for V6 {
    type Addr = Addr6;
    type FlowKey = FlowKey6;
    type RevKey = RevNatKey6;
    type RevValue = RevNatValue6;
    type FragKey = FragKey6;
    const SRC_OFF: usize = IP6_SRC_OFF;
    const DST_OFF: usize = IP6_DST_OFF;
    const FAMILY: u8 = 6;

    #[inline(always)]
    fn words(a: Addr6) -> (u64, u64) {
        (
            a[0] as u64 | (a[1] as u64) << 32,
            a[2] as u64 | (a[3] as u64) << 32,
        )
    }

    #[inline(always)]
    fn self_addr(cfg: &Config) -> Addr6 {
        cfg.self_addr6
    }
    #[inline(always)]
    fn is_node(addr: Addr6) -> bool {
        // SAFETY: only existence is checked.
        unsafe { ST8S_NODES6.get(addr) }.is_some()
    }
    #[inline(always)]
    fn pod_addr(port: &PortInfo) -> Option<Addr6> {
        some_addr6(port.local_addr6)
    }
    #[inline(always)]
    fn flows() -> &'static LruHashMap<FlowKey6, FlowValue> {
        &ST8S_FLOWS6
    }
    #[inline(always)]
    fn flow_key_of(client: Addr6, client_port: u16, frontend_port: u16, proto: u8) -> FlowKey6 {
        FlowKey6 {
            client_addr: client,
            client_port_be: client_port,
            frontend_port_be: frontend_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn flow_hash(key: &FlowKey6, frontend: &Addr6, seed: u32) -> u32 {
        flow_hash6(key, frontend, seed)
    }
    #[inline(always)]
    fn revnat() -> &'static LruHashMap<RevNatKey6, RevNatValue6> {
        &ST8S_REVNAT6
    }
    #[inline(always)]
    fn rev_key(pod: Addr6, client: Addr6, pod_port: u16, client_port: u16, proto: u8) -> RevNatKey6 {
        RevNatKey6 {
            pod_addr: pod,
            client_addr: client,
            pod_port_be: pod_port,
            client_port_be: client_port,
            proto,
            _pad: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn rev_value(frontend: Addr6, frontend_port: u16, slot: u16, stamp_ns: u64) -> RevNatValue6 {
        RevNatValue6 {
            frontend_addr: frontend,
            frontend_port_be: frontend_port,
            slot,
            _pad: 0,
            stamp_ns,
        }
    }
    #[inline(always)]
    fn reply(v: &RevNatValue6) -> Reply<Addr6> {
        Reply {
            frontend: v.frontend_addr,
            frontend_port: v.frontend_port_be,
            slot: v.slot,
            stamp_ns: v.stamp_ns,
        }
    }
    #[inline(always)]
    fn stamp(v: &mut RevNatValue6) -> &mut u64 {
        &mut v.stamp_ns
    }
    #[inline(always)]
    fn frags() -> &'static LruHashMap<FragKey6, FragValue> {
        &ST8S_FRAGS6
    }
    #[inline(always)]
    fn frag_key(pkt: &Packet<Self>) -> FragKey6 {
        FragKey6 {
            saddr: pkt.saddr,
            daddr: pkt.daddr,
            id_be: pkt.ip_id,
            proto: pkt.proto,
            _pad: 0,
            _pad2: 0,
        }
    }
    /// IPv6 has no header checksum; the address's share of the L4 checksum goes in as a
    /// difference. On a CHECKSUM_COMPLETE skb (NICs that sum the whole packet on receive),
    /// `bpf_l4_csum_replace` with a pseudo-header difference also subtracts it from `skb->csum`,
    /// which is right for IPv4 (the IPv4 header checksum moves too) and wrong for IPv6, where the
    /// address and the L4 checksum changes cancel (kernel-patches/bpf#8975 added `BPF_F_IPV6`
    /// for it in 6.16); `bpf_csum_update` adds it back, on every kernel, and does nothing in the
    /// other checksum states.
    #[inline(always)]
    fn rewrite_addr(
        ctx: &TcContext,
        l4: Option<(usize, u64)>,
        off: usize,
        old: Addr6,
        new: Addr6,
    ) -> Result<(), i64> {
        if let Some((csum_off, flags)) = l4 {
            let diff = addr6_diff(&old, &new);
            ctx.l4_csum_replace(csum_off, 0, diff, BPF_F_PSEUDO_HDR | flags)?;
            // SAFETY: plain helper call on this program's own skb.
            unsafe { bpf_csum_update(ctx.skb.skb, diff as u32) };
        }
        ctx.store(off, &new, 0)
    }
}

/// What replacing the IPv6 address `old` by `new` adds to a checksum, for `l4_csum_replace`
/// with a zero size (a difference, not a field): the one's complement sum of `new` and of `old`
/// complemented, 32-bit words as they sit in the packet, folded to 32 bits. That is what
/// `bpf_csum_diff` returns (its `csum_partial`), without the helper call.
#[inline(always)]
fn addr6_diff(old: &Addr6, new: &Addr6) -> u64 {
    let mut sum = 0u64;
    let mut i = 0;
    while i < 4 {
        sum += (!old[i]) as u64 + new[i] as u64;
        i += 1;
    }
    sum = (sum & 0xffff_ffff) + (sum >> 32);
    (sum & 0xffff_ffff) + (sum >> 32)
}

/// A whole datagram: the L4 header is there.
const FRAG_NONE: u8 = 0;
/// The first fragment (offset 0, more to come): it carries the L4 header and its ports.
const FRAG_FIRST: u8 = 1;
/// A fragment after the first: no L4 header; its ports are the first fragment's (`ST8S_FRAGS`).
const FRAG_LATER: u8 = 2;
/// A fragment that reaches past the 65,535 bytes an IP datagram can have.
const FRAG_INVALID: u8 = 3;

/// Reads the headers between `start` and `end` (packet data pointers). Anything that is not a
/// plain IPv4 TCP/UDP packet — other ethertypes (ARP, IPv6, VLAN), IP options, headers cut
/// short, lengths that do not add up — yields `None`, and the caller passes it untouched. A
/// fragment after the first comes back without ports (`FRAG_LATER`): [`fragment_ports`] fills
/// them in.
#[inline(always)]
fn parse(start: usize, end: usize, wire_len: usize) -> Option<Packet<V4>> {
    if start + L4_OFF > end {
        return None;
    }
    let eth = read_bytes::<14>(start, end, 0)?;
    if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
        return None;
    }
    let ip = read_bytes::<20>(start, end, ETH_HLEN)?;
    // Version 4, IHL 5: packets with IP options go to the kernel (as Katran does).
    if ip[0] != 0x45 {
        return None;
    }
    let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
    let proto = ip[9];
    let l4_min = match proto {
        PROTO_TCP => TCP_HLEN,
        PROTO_UDP => UDP_HLEN,
        _ => return None,
    };
    if tot_len <= IPV4_HLEN || ETH_HLEN + tot_len > wire_len {
        return None;
    }
    let frag_field = u16::from_be_bytes([ip[6], ip[7]]);
    let offset = (frag_field & 0x1fff) as usize * 8;
    let frag = if offset != 0 {
        // RFC 791: a datagram is at most 65,535 bytes; a fragment beyond that is malformed.
        if offset + tot_len - IPV4_HLEN > 0xffff {
            FRAG_INVALID
        } else {
            FRAG_LATER
        }
    } else if frag_field & 0x2000 != 0 {
        FRAG_FIRST
    } else {
        FRAG_NONE
    };
    let dst_mac = [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]];
    let src_mac = [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]];
    let saddr = u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]);
    let daddr = u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]);
    let ip_id = u16::from_ne_bytes([ip[4], ip[5]]) as u32;
    if frag >= FRAG_LATER {
        return Some(Packet {
            dst_mac,
            src_mac,
            saddr,
            daddr,
            sport: 0,
            dport: 0,
            proto,
            tcp_flags: 0,
            frag,
            ip_id,
            l4_off: L4_OFF,
        });
    }
    // A first fragment too short for its L4 header (RFC 1858's tiny fragment) is not ours.
    if tot_len < IPV4_HLEN + l4_min {
        return None;
    }
    let ports = read_bytes::<4>(start, end, L4_OFF)?;
    if start + L4_OFF + l4_min > end {
        return None;
    }
    let tcp_flags = if proto == PROTO_TCP {
        read_bytes::<1>(start, end, L4_OFF + 13)?[0]
    } else {
        0
    };
    Some(Packet {
        dst_mac,
        src_mac,
        saddr,
        daddr,
        sport: u16::from_ne_bytes([ports[0], ports[1]]),
        dport: u16::from_ne_bytes([ports[2], ports[3]]),
        proto,
        tcp_flags,
        frag,
        ip_id,
        l4_off: L4_OFF,
    })
}

/// Why an IPv6 packet is not parsed.
enum Skip6 {
    /// Not an IPv6 TCP/UDP packet st8s could steer (ND and other ICMPv6 among them).
    Other,
    /// More extension headers before the TCP or UDP header than [`MAX_EXT_HEADERS`].
    TooManyHeaders,
}

/// [`parse`] for IPv6 (RFC 8200): the extension headers (hop-by-hop, routing, destination
/// options, authentication, fragment) are walked, at most [`MAX_EXT_HEADERS`] of them, to
/// the TCP or UDP header. A fragment header makes the packet a fragment, as in IPv4. Anything
/// else (ICMPv6, neighbour discovery among it; no next header; a jumbogram; headers cut short or
/// outside the linear data) is not st8s's.
#[inline(always)]
fn parse6(start: usize, end: usize, wire_len: usize) -> Result<Packet<V6>, Skip6> {
    use Skip6::Other;
    // Field by field: copies of whole headers cost stack the IPv6 keys need.
    if start + ETH_HLEN + IPV6_HLEN > end || read::<u16>(start, end, 12) != Some(ETH_P_IPV6.to_be()) {
        return Err(Other);
    }
    let fixed = read::<[u8; 8]>(start, end, ETH_HLEN).ok_or(Other)?;
    let payload_len = u16::from_be_bytes([fixed[4], fixed[5]]) as usize;
    let ip_end = ETH_HLEN + IPV6_HLEN + payload_len;
    if fixed[0] >> 4 != 6 || payload_len == 0 || ip_end > wire_len {
        return Err(Other);
    }
    let mut next = fixed[6];
    let mut off = ETH_HLEN + IPV6_HLEN;
    let mut frag = FRAG_NONE;
    let mut ip_id = 0;
    let mut i = 0;
    while i < MAX_EXT_HEADERS {
        match next {
            // Hop-by-hop, routing, destination options: length in 8-byte units, after the first 8.
            0 | 43 | 60 => {
                let h = read_bytes::<2>(start, end, off).ok_or(Other)?;
                next = h[0];
                off += (h[1] as usize + 1) * 8;
            }
            // Authentication header (RFC 4302): length in 4-byte units, minus 2.
            51 => {
                let h = read_bytes::<2>(start, end, off).ok_or(Other)?;
                next = h[0];
                off += (h[1] as usize + 2) * 4;
            }
            44 => {
                let h = read_bytes::<8>(start, end, off).ok_or(Other)?;
                next = h[0];
                let field = u16::from_be_bytes([h[2], h[3]]);
                let offset = (field & 0xfff8) as usize;
                ip_id = u32::from_ne_bytes([h[4], h[5], h[6], h[7]]);
                off += 8;
                frag = if offset != 0 {
                    // The fragmentable part of a datagram is at most 65,535 bytes too.
                    if offset + ip_end.saturating_sub(off) > 0xffff {
                        FRAG_INVALID
                    } else {
                        FRAG_LATER
                    }
                } else if field & 1 != 0 {
                    FRAG_FIRST
                } else {
                    // An atomic fragment (RFC 6946): a whole datagram.
                    FRAG_NONE
                };
            }
            _ => break,
        }
        i += 1;
    }
    let l4_min = match next {
        PROTO_TCP => TCP_HLEN,
        PROTO_UDP => UDP_HLEN,
        0 | 43 | 60 | 51 | 44 => return Err(Skip6::TooManyHeaders),
        _ => return Err(Other),
    };
    let mut pkt = Packet {
        dst_mac: read(start, end, 0).ok_or(Other)?,
        src_mac: read(start, end, 6).ok_or(Other)?,
        saddr: read(start, end, IP6_SRC_OFF).ok_or(Other)?,
        daddr: read(start, end, IP6_DST_OFF).ok_or(Other)?,
        sport: 0,
        dport: 0,
        proto: next,
        tcp_flags: 0,
        frag,
        ip_id,
        l4_off: off,
    };
    if frag >= FRAG_LATER {
        return Ok(pkt);
    }
    if off + l4_min > ip_end {
        return Err(Other);
    }
    let ports = read_bytes::<4>(start, end, off).ok_or(Other)?;
    if start + off + l4_min > end {
        return Err(Other);
    }
    if next == PROTO_TCP {
        pkt.tcp_flags = read_bytes::<1>(start, end, off + 13).ok_or(Other)?[0];
    }
    pkt.sport = u16::from_ne_bytes([ports[0], ports[1]]);
    pkt.dport = u16::from_ne_bytes([ports[2], ports[3]]);
    Ok(pkt)
}

/// A fragment after the first gets the ports its first fragment carried, if st8s steered that
/// one less than [`FRAG_TIMEOUT_NS`] ago; then the same decision and translation apply to it as
/// to the first. Otherwise it is not st8s's (`None`: left to the kernel, which reassembles or
/// drops it by its own rules). `misses`: the program that sees every such packet last
/// counts and reports the ones it leaves (an XDP program passes them on to TC, which does).
#[inline(always)]
fn fragment_ports<F: Family>(pkt: &mut Packet<F>, misses: Option<&TcContext>) -> Option<()> {
    match pkt.frag {
        FRAG_NONE | FRAG_FIRST => Some(()),
        FRAG_LATER => {
            // SAFETY: copied out at once.
            let found = unsafe { F::frags().get(F::frag_key(pkt)) }.copied();
            // SAFETY: plain helper call.
            let fresh =
                found.filter(|f| unsafe { bpf_ktime_get_ns() }.wrapping_sub(f.stamp_ns) <= FRAG_TIMEOUT_NS);
            match fresh {
                Some(f) => {
                    pkt.sport = f.sport_be;
                    pkt.dport = f.dport_be;
                    Some(())
                }
                None => {
                    if let Some(ctx) = misses {
                        count(GLOBAL_COUNTER_SLOT, |c| c.frag_untracked += 1);
                        note::<F>(ctx, EVENT_FRAG_UNTRACKED, GLOBAL_COUNTER_SLOT, None);
                    }
                    None
                }
            }
        }
        _ => {
            if let Some(ctx) = misses {
                count(GLOBAL_COUNTER_SLOT, |c| c.frag_invalid += 1);
                note::<F>(ctx, EVENT_FRAG_INVALID, GLOBAL_COUNTER_SLOT, None);
            }
            None
        }
    }
}

/// Where st8s acts on a first fragment, the rest of its datagram will follow it: its ports are
/// remembered. A later fragment that was acted on is counted on its port.
#[inline(always)]
fn follow_fragments<F: Family>(pkt: &Packet<F>, slot: u32) {
    if pkt.frag == FRAG_FIRST {
        let v = FragValue {
            sport_be: pkt.sport,
            dport_be: pkt.dport,
            _pad: 0,
            // SAFETY: plain helper call.
            stamp_ns: unsafe { bpf_ktime_get_ns() },
        };
        // A full LRU evicts the oldest train; an insert failure leaves the rest to the kernel.
        let _ = F::frags().insert(F::frag_key(pkt), v, 0);
    } else if pkt.frag == FRAG_LATER {
        count(slot, |c| c.fragments += 1);
    }
}

/// The one bounds-checked read of packet data.
#[inline(always)]
fn read_bytes<const N: usize>(start: usize, end: usize, offset: usize) -> Option<[u8; N]> {
    read(start, end, offset)
}

/// A `T` (plain bytes: an integer or an array of them) read from packet data, bounds-checked.
///
/// Packet data has no alignment a compiler may rely on (the IP header sits 14 bytes into the
/// frame), so a plain unaligned read compiles to one load per byte and the shifts that put them
/// together: an IPv6 address took 16 loads and 30 ALU instructions. The kernel lets BPF programs
/// read packet data at any alignment on the architectures that have efficient unaligned access
/// (x86-64, arm64; `check_pkt_ptr_alignment` is strict only elsewhere or under
/// `BPF_F_STRICT_ALIGNMENT`), so the bytes are copied with the widest loads that fit, written
/// as BPF assembly the compiler cannot split, into an 8-byte aligned buffer on the stack (the
/// verifier insists on aligned stack access).
#[inline(always)]
fn read<T: Copy>(start: usize, end: usize, offset: usize) -> Option<T> {
    let n = core::mem::size_of::<T>();
    if start + offset + n > end {
        return None;
    }
    let p = start + offset;
    let mut buf = Aligned(core::mem::MaybeUninit::<T>::uninit());
    let dst = buf.0.as_mut_ptr() as *mut u8;
    let mut i = 0;
    // SAFETY: every load is inside the range checked against the end of the packet data above;
    // every store is inside `buf` at an offset that is a multiple of its size (the buffer is
    // 8-byte aligned), and together they write all `n` bytes, so `buf` is initialised. `T` is
    // plain bytes, valid for any bit pattern (every caller reads integers or arrays of them).
    unsafe {
        while i + 8 <= n {
            *(dst.add(i) as *mut u64) = load::<8>(p + i);
            i += 8;
        }
        if i + 4 <= n {
            *(dst.add(i) as *mut u32) = load::<4>(p + i) as u32;
            i += 4;
        }
        if i + 2 <= n {
            *(dst.add(i) as *mut u16) = load::<2>(p + i) as u16;
            i += 2;
        }
        if i < n {
            *dst.add(i) = *((p + i) as *const u8);
        }
        Some(buf.0.assume_init())
    }
}

/// A stack buffer the verifier accepts 8-byte stores into.
#[repr(C, align(8))]
struct Aligned<T>(T);

/// One load of `N` (2, 4 or 8) bytes at `p`, zero-extended, at whatever alignment `p` has.
///
/// # Safety
/// `p` must point into packet data the verifier knows to be in range for `N` bytes.
#[inline(always)]
unsafe fn load<const N: usize>(p: usize) -> u64 {
    let v: u64;
    // SAFETY: the caller's; the instruction only reads.
    unsafe {
        match N {
            8 => {
                core::arch::asm!("{0} = *(u64 *)({1} + 0)", lateout(reg) v, in(reg) p, options(pure, readonly, nostack))
            }
            4 => {
                core::arch::asm!("{0} = *(u32 *)({1} + 0)", lateout(reg) v, in(reg) p, options(pure, readonly, nostack))
            }
            _ => {
                core::arch::asm!("{0} = *(u16 *)({1} + 0)", lateout(reg) v, in(reg) p, options(pure, readonly, nostack))
            }
        }
    }
    v
}

/// What to do with a packet.
enum Steer {
    /// Not a steered port, or not addressed to a node: st8s has no business with it.
    NotOurs,
    /// Steered port, but left to the kernel (counted as `passed` or `untrusted_peer`).
    Pass { slot: u32, untrusted: bool },
    /// Deliver to this node's backend pod. `established`: the flow's reply translation is known
    /// to be in place (nothing to write or check before the DNAT).
    Local { port: PortInfo, established: bool },
    /// Send to the node that owns the chosen backend.
    Remote { slot: u32, mac: [u8; 6] },
    /// Drop: forwarded here by a peer, but there is no backend on this node.
    DropNoLocal { slot: u32 },
}

/// The `ST8S_PORT_INDEX` word of a steered (port, protocol) (see `port_word`): one array read,
/// no hashing. `None` when the port is not steered.
#[inline(always)]
fn port_word_of(proto: u8, port_be: u16) -> Option<u32> {
    let index = port_index(proto, u16::from_be(port_be) as u32);
    match ST8S_PORT_INDEX.get(index) {
        Some(&w) if w != 0 => Some(w),
        _ => None,
    }
}

/// The live `PortInfo` a port word names.
#[inline(always)]
fn port_info_at(word: u32) -> Option<PortInfo> {
    ST8S_PORT_INFO.get(word_info_index(word)).copied()
}

/// The live `PortInfo` of a steered (port, protocol): two array reads, no hashing.
#[inline(always)]
fn port_info_of(proto: u8, port_be: u16) -> Option<PortInfo> {
    port_info_at(port_word_of(proto, port_be)?)
}

#[inline(always)]
fn config() -> Option<&'static Config> {
    ST8S_CONFIG.get(0)
}

/// The steering decision, shared by the XDP and the TC program so that both agree on every flow.
#[inline(always)]
fn steer<F: Family>(pkt: &Packet<F>, cfg: &Config) -> Steer {
    // Only frames addressed to this node's MAC: a switch that floods a frame meant for another
    // node (its port went down, its address aged out) must not make this node serve it too.
    if pkt.dst_mac != cfg.self_mac {
        return Steer::NotOurs;
    }
    let Some(word) = port_word_of(pkt.proto, pkt.dport) else {
        return Steer::NotOurs;
    };
    if pkt.daddr == F::self_addr(cfg) {
        steer_frontend(pkt, cfg, word)
    } else {
        steer_forwarded(pkt, word)
    }
}

/// The port's live `PortInfo`, as seen by family `F`: a local pod without an address in this
/// family cannot take the packet, so for this family the node has no local backend.
#[inline(always)]
fn port_for<F: Family>(word: u32) -> Option<PortInfo> {
    let mut port = port_info_at(word)?;
    if F::pod_addr(&port).is_none() {
        port.has_local = 0;
    }
    Some(port)
}

/// A packet sent to another node's address: only a peer's forward may land here, and it must be
/// served by this node's own backend, never forwarded again (no loops).
#[inline(always)]
fn steer_forwarded<F: Family>(pkt: &Packet<F>, word: u32) -> Steer {
    let Some(port) = port_for::<F>(word) else {
        return Steer::NotOurs;
    };
    let slot = port.slot as u32;
    // A peer's forward of a flow this node already serves: the flow's reply translation (keyed
    // by this node's pod, naming the node the client sent to) proves that its first packet
    // passed the checks below, so one lookup decides (issue 18). A SYN takes the checks again;
    // a UDP datagram re-stamps the translation here.
    if let (false, Some(pod)) = (port.has_local == 0 || is_syn(pkt), F::pod_addr(&port)) {
        let key = F::rev_key(pod, pkt.saddr, port.local_port_be, pkt.sport, pkt.proto);
        if let Some(v) = live_translation(pkt, &key) {
            restamp(pkt, v);
            return Steer::Local {
                port,
                established: true,
            };
        }
    }
    if !F::is_node(pkt.daddr) {
        return Steer::NotOurs;
    }
    let mac = MacKey {
        mac: pkt.src_mac,
        _pad: [0; 2],
    };
    // SAFETY: only existence is checked.
    if unsafe { ST8S_PEER_MACS.get(mac) }.is_none() {
        return Steer::Pass {
            slot,
            untrusted: true,
        };
    }
    if port.has_local == 0 {
        return Steer::DropNoLocal { slot };
    }
    Steer::Local {
        port,
        established: false,
    }
}

/// A packet sent to this node's own address: a tracked flow keeps its backend, a new one is
/// placed.
#[inline(always)]
fn steer_frontend<F: Family>(pkt: &Packet<F>, cfg: &Config, word: u32) -> Steer {
    let key = F::flow_key(pkt);
    // A TCP segment after the SYN: the flow's reply translation was written with its first
    // packet and re-stamped by its SYN, so nothing more is read for it (issue 18). UDP
    // re-stamps it per datagram, which takes the lookup.
    let established = pkt.proto == PROTO_TCP && !is_syn(pkt);
    // SAFETY: the entry is read, and written back only where it names a checked verdict; the
    // LRU keeps its own recency.
    let Some(f) = F::flows().get_ptr_mut(&key) else {
        let Some(port) = port_for::<F>(word) else {
            return Steer::NotOurs;
        };
        return place(pkt, cfg, word, &port, &key);
    };
    // SAFETY: a live entry of the flow table; the two fields written are read only here.
    let f = unsafe { &mut *f };
    // The verdict was checked under the port's current word: it stands. Nothing else is read
    // for a remote flow (one lookup decides, issue 18); a local one reads the port for its
    // pod's address.
    let current = f.port_word == word;
    if current && f.kind == FLOW_REMOTE {
        return Steer::Remote {
            slot: word_slot(word),
            mac: f.node_mac,
        };
    }
    let Some(port) = port_for::<F>(word) else {
        return Steer::NotOurs;
    };
    if current && f.kind == FLOW_LOCAL {
        return Steer::Local { port, established };
    }
    if port.backend_count == 0 {
        return place(pkt, cfg, word, &port, &key);
    }
    if let Some(s) = still_valid(f, &port) {
        // Checked under this word: the next packets take the one-lookup path. The MAC is
        // written before the word that vouches for it.
        if let Steer::Remote { mac, .. } = s {
            f.node_mac = mac;
        }
        f.port_word = word;
        return match s {
            Steer::Local { port, .. } => Steer::Local { port, established },
            s => s,
        };
    }
    place(pkt, cfg, word, &port, &key)
}

/// A flow not tracked yet, or whose backend went away: its backend is chosen, and the flow
/// entry written.
#[inline(always)]
fn place<F: Family>(pkt: &Packet<F>, cfg: &Config, word: u32, port: &PortInfo, key: &F::FlowKey) -> Steer {
    let slot = port.slot as u32;
    if port.backend_count == 0 {
        return Steer::Pass {
            slot,
            untrusted: false,
        };
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    // New flow, or its backend went away: choose again. A connection from another node's own
    // stack (a peer's MAC, sent to this node's address) was already placed by that node's
    // socket-level steering, or its client picked this node itself: serve it here when possible.
    let prefer_local = cfg.flags & CONFIG_PREFER_LOCAL != 0 || {
        let mac = MacKey {
            mac: pkt.src_mac,
            _pad: [0; 2],
        };
        // SAFETY: only existence is checked.
        unsafe { ST8S_PEER_MACS.get(mac) }.is_some()
    };
    let (flow, verdict) = match choose(port, F::flow_hash(key, &pkt.daddr, cfg.hash_seed), prefer_local) {
        Choice::Remote { backend: b, idx } => (
            FlowValue {
                backend_addr_be: b.node_addr_be,
                backend_port_be: 0,
                kind: FLOW_REMOTE,
                backend_hint: idx,
                created_ns: now,
                port_word: word,
                node_mac: b.node_mac,
                _pad: [0; 6],
            },
            Steer::Remote {
                slot,
                mac: b.node_mac,
            },
        ),
        Choice::Local => (
            FlowValue {
                backend_addr_be: port.local_addr_be,
                backend_port_be: port.local_port_be,
                kind: FLOW_LOCAL,
                backend_hint: 0,
                created_ns: now,
                port_word: word,
                node_mac: [0; 6],
                _pad: [0; 6],
            },
            Steer::Local {
                port: *port,
                established: false,
            },
        ),
        // No backend takes new flows here (draining, or the table says "this node" but the pod
        // is gone): let the kernel answer.
        Choice::None => {
            return Steer::Pass {
                slot,
                untrusted: false,
            }
        }
    };
    // A full LRU evicts the oldest flow; an insert failure only costs stickiness.
    let _ = F::flows().insert(key, flow, 0);
    verdict
}

/// Where a new flow goes.
enum Choice {
    /// The backend pod on this node.
    Local,
    /// Another node's backend (`idx` in the port's live backend list).
    Remote { backend: Backend, idx: u8 },
    /// Nowhere: no backend takes new flows.
    None,
}

/// The backend of a new flow with hash `h`: this node's pod when `prefer_local` and it takes new
/// flows, otherwise the port's Maglev row. Packets from the LAN and sockets on the node choose
/// through this one function, so both place a flow the same way.
#[inline(always)]
fn choose(port: &PortInfo, h: u32, prefer_local: bool) -> Choice {
    let local_takes_new = port.has_local != 0 && port.flags & PORT_LOCAL_DRAINING == 0;
    if prefer_local && local_takes_new {
        return Choice::Local;
    }
    let Some(row) = ST8S_MAGLEV.get(port.maglev_index()) else {
        return Choice::None;
    };
    let pos = bounded((h as usize) % MAGLEV_SIZE);
    if pos >= MAGLEV_SIZE {
        return Choice::None;
    }
    let idx = row.slots[pos] as u32;
    if idx >= port.backend_count as u32 || idx >= MAX_BACKENDS {
        return Choice::None;
    }
    match ST8S_BACKENDS.get(port.backend_index(idx)) {
        // Draining backends keep their flows but take no new one (and no row names a vacant
        // place).
        Some(b) if b.flags & (BACKEND_DRAINING | BACKEND_VACANT) != 0 => Choice::None,
        Some(b) if b.flags & BACKEND_LOCAL != 0 => {
            if port.has_local != 0 {
                Choice::Local
            } else {
                Choice::None
            }
        }
        Some(b) => Choice::Remote {
            backend: *b,
            idx: idx as u8,
        },
        None => Choice::None,
    }
}

/// Hides a value's provenance from the optimiser, so that the bounds check that follows is kept
/// and the verifier sees it (LLVM turns `% MAGLEV_SIZE` into a multiply the verifier cannot bound).
#[inline(always)]
fn bounded(v: usize) -> usize {
    let slot = v;
    // SAFETY: a volatile read of a local.
    unsafe { core::ptr::read_volatile(&slot) }
}

/// A tracked flow keeps its backend as long as that backend still serves the port.
#[inline(always)]
fn still_valid(f: &FlowValue, port: &PortInfo) -> Option<Steer> {
    let slot = port.slot as u32;
    if f.kind == FLOW_LOCAL {
        if port.has_local != 0
            && port.local_addr_be == f.backend_addr_be
            && port.local_port_be == f.backend_port_be
        {
            return Some(Steer::Local {
                port: *port,
                established: false,
            });
        }
        return None;
    }
    let count = port.backend_count as u32;
    // The backend is where it was chosen for as long as it serves the port: one array read.
    let hint = f.backend_hint as u32;
    if hint < count {
        if let Some(b) = ST8S_BACKENDS.get(port.backend_index(hint)) {
            if b.node_addr_be == f.backend_addr_be && b.flags & BACKEND_LOCAL == 0 {
                return Some(Steer::Remote {
                    slot,
                    mac: b.node_mac,
                });
            }
        }
    }
    // Not there: the node left the port. (The agent keeps every node at its place in the list
    // while it stays, `MapWriter::write_port`, so no other place can hold it.)
    None
}

#[inline(always)]
fn count(slot: u32, f: impl FnOnce(&mut Counters)) {
    let slot = if slot < MAX_PORTS {
        slot
    } else {
        GLOBAL_COUNTER_SLOT
    };
    if let Some(c) = ST8S_COUNTERS.get_ptr_mut(slot) {
        // SAFETY: per-CPU value, only this CPU writes it while the program runs.
        f(unsafe { &mut *c });
    }
}

// The monitor. The programs ask `monitoring()` (one array read and a compare when no one
// listens) once per packet: XDP at its one decision, TC at its entry (the decisions note
// themselves in the skb, see `note`). Only then do they call a reporting subprogram, which
// reserves an `Event` in the ring buffer, fills it, copies the packet's first bytes and submits
// it. The subprograms take everything in registers.

/// Whether `st8s monitor` listens (see `MonitorCtl`).
#[inline(always)]
fn monitoring() -> bool {
    match ST8S_MONITOR.get(0) {
        // SAFETY: plain helper call.
        Some(m) if m.until_ns != 0 => (unsafe { bpf_ktime_get_ns() }) < m.until_ns,
        _ => false,
    }
}

/// An event's small fields in one register: kind, slot, family, protocol, the replaced port
/// and the socket's new port, a byte or two each.
#[inline(always)]
fn event_word(kind: u8, slot: u32, family: u8, proto: u8, was_port: u16, to_port: u16) -> u64 {
    kind as u64
        | ((slot as u64) & 0xff) << 8
        | (family as u64) << 16
        | (proto as u64) << 24
        | (was_port as u64) << 32
        | (to_port as u64) << 48
}

/// A reserved event with its head filled from `event_word`'s word and the replaced address;
/// `None` (and counted) when the ring buffer is full.
#[inline(always)]
fn new_event(word: u64, was_lo: u64, was_hi: u64) -> Option<aya_ebpf::maps::ring_buf::RingBufEntry<Event>> {
    let Some(mut e) = ST8S_EVENTS.reserve::<Event>(0) else {
        count(GLOBAL_COUNTER_SLOT, |c| c.monitor_lost += 1);
        return None;
    };
    let ev = e.as_mut_ptr();
    // SAFETY: `ev` is the reserved record, large enough for an `Event`; every field the reader
    // uses is written below or by the caller.
    unsafe {
        (*ev).ts_ns = bpf_ktime_get_ns();
        (*ev).kind = word as u8;
        (*ev).slot = ((word >> 8) & 0xff) as u16;
        (*ev).family = (word >> 16) as u8;
        (*ev).proto = (word >> 24) as u8;
        (*ev)._pad = 0;
        (*ev).was_port_be = (word >> 32) as u16;
        (*ev).to_port_be = (word >> 48) as u16;
        (*ev).was = [
            was_lo as u32,
            (was_lo >> 32) as u32,
            was_hi as u32,
            (was_hi >> 32) as u32,
        ];
        (*ev).to = [0; 4];
        (*ev).snap_len = 0;
        (*ev).pkt_len = 0;
        (*ev).ifindex = 0;
    }
    Some(e)
}

/// Reports a TC program's decision on the packet in `skb` (as it is now, translated or not).
#[inline(never)]
fn report_skb(skb: *mut __sk_buff, word: u64, was_lo: u64, was_hi: u64) {
    let Some(mut e) = new_event(word, was_lo, was_hi) else {
        return;
    };
    let ev = e.as_mut_ptr();
    // SAFETY: `skb` is the calling program's own context; `ev` as in `new_event`.
    unsafe {
        let len = (*skb).len;
        (*ev).pkt_len = len;
        (*ev).ifindex = (*skb).ifindex;
        let n = (len as usize).min(EVENT_SNAP);
        // The length as 1..=128 by arithmetic the verifier follows (6.1's does not take
        // `n != 0` for a lower bound); `bounded` keeps LLVM from folding it back to `n`.
        let n = (bounded(n.wrapping_sub(1)) & (EVENT_SNAP - 1)) + 1;
        if len > 0
            && bpf_skb_load_bytes(
                skb as *const _,
                0,
                core::ptr::addr_of_mut!((*ev).data) as *mut _,
                n as u32,
            ) == 0
        {
            (*ev).snap_len = n as u16;
        }
    }
    e.submit(0);
}

/// Reports the XDP program's decision on the packet between `start` and `end`, copied with
/// direct reads (`bpf_xdp_load_bytes` came only in 5.18): 8 bytes at a time, then the tail.
#[inline(never)]
fn report_xdp(start: usize, end: usize, word: u64) {
    let Some(mut e) = new_event(word, 0, 0) else {
        return;
    };
    let ev = e.as_mut_ptr();
    // SAFETY: every read is bounds-checked against `end` first; `ev` as in `new_event`.
    unsafe {
        (*ev).pkt_len = (end - start) as u32;
        let data = core::ptr::addr_of_mut!((*ev).data) as *mut u8;
        // `bounded` hides each read's address from the optimiser, which would otherwise compare
        // against `end - 8`: arithmetic on the packet's end that the verifier refuses.
        let mut off = 0usize;
        while off + 8 <= EVENT_SNAP {
            let at = bounded(start + off);
            if at + 8 > end {
                break;
            }
            let w = core::ptr::read_unaligned(at as *const u64);
            core::ptr::write_unaligned(data.add(off) as *mut u64, w);
            off += 8;
        }
        while off < EVENT_SNAP {
            let at = bounded(start + off);
            if at + 1 > end {
                break;
            }
            *data.add(off) = *(at as *const u8);
            off += 1;
        }
        (*ev).snap_len = off as u16;
    }
    e.submit(0);
}

/// Reports a socket-level steer: the frontend the application named (`was`), the backend it now
/// talks to (`to`); no packet.
#[inline(never)]
fn report_sock(word: u64, was_lo: u64, was_hi: u64, to_lo: u64, to_hi: u64) {
    let Some(mut e) = new_event(word, was_lo, was_hi) else {
        return;
    };
    let ev = e.as_mut_ptr();
    // SAFETY: as in `new_event`.
    unsafe {
        (*ev).to = [
            to_lo as u32,
            (to_lo >> 32) as u32,
            to_hi as u32,
            (to_hi >> 32) as u32,
        ];
    }
    e.submit(0);
}

/// Notes a TC decision on a packet of family `F` in the skb's scratch words (`cb`, the TC
/// programs' own): the kind, family and slot, and what the translation replaced. Plain stores,
/// no branch: the entry point reports the note once, if someone listens (`tc_monitored`). A
/// report at each of the twenty-odd decisions instead put the ring buffer's code on every path,
/// which took Debian 12's 6.1 verifier 690,000 instructions and more stack than a call chain
/// has.
#[inline(always)]
fn note<F: Family>(ctx: &TcContext, kind: u8, slot: u32, was: Option<(F::Addr, u16)>) {
    let (lo, hi, port) = match was {
        Some((a, p)) => {
            let (lo, hi) = F::words(a);
            (lo, hi, p)
        }
        None => (0, 0, 0),
    };
    let head = kind as u32 | ((F::FAMILY == 6) as u32) << 7 | (slot & 0xff) << 8 | (port as u32) << 16;
    let skb = ctx.skb.skb;
    // SAFETY: this program's own __sk_buff; TC programs may write cb[0..5]. One volatile store
    // per word: the verifier takes only fixed-offset word stores into the context, which LLVM
    // would otherwise merge into a `memset`.
    unsafe {
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).cb[0]), head);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).cb[1]), lo as u32);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).cb[2]), (lo >> 32) as u32);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).cb[3]), hi as u32);
        core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).cb[4]), (hi >> 32) as u32);
    }
}

/// Runs a TC program's decision (`decide`) and, if someone listens, reports the decision it
/// noted (see `note`). The scratch words hold whatever they held, so the note is cleared first,
/// always: a branch on `monitoring()` before the decision made the verifier walk every path of
/// it twice, past its million-instruction limit.
#[inline(always)]
fn tc_monitored(skb: *mut __sk_buff, decide: impl FnOnce() -> i32) -> i32 {
    // SAFETY: this program's own __sk_buff.
    unsafe { core::ptr::write_volatile(core::ptr::addr_of_mut!((*skb).cb[0]), 0) };
    let verdict = decide();
    if monitoring() {
        // SAFETY: as above.
        let (w, lo, hi) = unsafe {
            (
                (*skb).cb[0],
                (*skb).cb[1] as u64 | ((*skb).cb[2] as u64) << 32,
                (*skb).cb[3] as u64 | ((*skb).cb[4] as u64) << 32,
            )
        };
        if w != 0 {
            let family = if w & 0x80 != 0 { 6 } else { 4 };
            let word = event_word((w & 0x7f) as u8, (w >> 8) & 0xff, family, 0, (w >> 16) as u16, 0);
            report_skb(skb, word, lo, hi);
        }
    }
    verdict
}

#[xdp]
pub fn st8s_uplink_xdp(ctx: XdpContext) -> u32 {
    // Each family's path is a function of its own (a BPF subprogram with its own stack frame):
    // inlined together, the IPv6 keys and the IPv4 path's would not fit one 512-byte stack.
    // They take the packet's bounds, not the context: LLVM would pass the context's fields
    // instead of the pointer anyway, as values the verifier refuses to treat as packet pointers.
    let (start, end) = (ctx.data(), ctx.data_end());
    if is_ipv6_frame(start, end) {
        uplink_xdp6::<true>(start, end)
    } else {
        uplink_xdp4::<true>(start, end)
    }
}

/// Benchmark reference: `st8s_uplink_xdp` with the monitor compiled out, to show what asking
/// "does anyone listen?" costs when no one does.
#[xdp]
pub fn st8s_uplink_xdp_unmonitored(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    if is_ipv6_frame(start, end) {
        uplink_xdp6::<false>(start, end)
    } else {
        uplink_xdp4::<false>(start, end)
    }
}

#[inline(never)]
fn uplink_xdp4<const MONITOR: bool>(start: usize, end: usize) -> u32 {
    parse(start, end, end - start)
        .and_then(|pkt| xdp_forward::<V4, MONITOR>(start, end, pkt))
        .unwrap_or(xdp_action::XDP_PASS)
}

#[inline(never)]
fn uplink_xdp6<const MONITOR: bool>(start: usize, end: usize) -> u32 {
    parse6(start, end, end - start)
        .ok()
        .and_then(|pkt| xdp_forward::<V6, MONITOR>(start, end, pkt))
        .unwrap_or(xdp_action::XDP_PASS)
}

#[inline(always)]
fn xdp_forward<F: Family, const MONITOR: bool>(start: usize, end: usize, mut pkt: Packet<F>) -> Option<u32> {
    let cfg = config()?;
    // Only the remote path is handled here; everything else is the TC program's job.
    if pkt.daddr != F::self_addr(cfg) {
        return None;
    }
    fragment_ports(&mut pkt, None)?;
    match steer(&pkt, cfg) {
        Steer::Remote { slot, mac } => {
            follow_fragments(&pkt, slot);
            if start + ETH_HLEN > end {
                return None;
            }
            let eth = start as *mut u8;
            // SAFETY: the Ethernet header was bounds-checked above. Byte stores: a 6-byte array
            // copy would become a call to `memmove`.
            unsafe {
                let mut i = 0;
                while i < 6 {
                    *eth.add(i) = mac[i];
                    *eth.add(6 + i) = cfg.self_mac[i];
                    i += 1;
                }
            }
            count(slot, |c| c.forwarded += 1);
            if MONITOR && monitoring() {
                report_xdp(start, end, event_word(EVENT_FORWARDED, slot, F::FAMILY, 0, 0, 0));
            }
            Some(xdp_action::XDP_TX)
        }
        _ => None,
    }
}

const PROTO_ICMP: u8 = 1;
const ICMP_CSUM_OFF: usize = L4_OFF + 2;
/// The packet an ICMP error quotes: its IP header (no options), then its first L4 bytes.
const INNER_IP_OFF: usize = L4_OFF + 8;
const INNER_CSUM_OFF: usize = INNER_IP_OFF + 10;
/// Through the quoted packet's ports.
const ICMP_PARSE_LEN: usize = INNER_IP_OFF + IPV4_HLEN + 4;

const PROTO_ICMPV6: u8 = 58;
/// An ICMPv6 error right after the IPv6 header (an outer extension header: not st8s's).
const ICMP6_OFF: usize = ETH_HLEN + IPV6_HLEN;
const ICMP6_CSUM_OFF: usize = ICMP6_OFF + 2;
/// The quoted IPv6 packet (no extension headers), then its first L4 bytes.
const INNER6_IP_OFF: usize = ICMP6_OFF + 8;
const ICMP6_PARSE_LEN: usize = INNER6_IP_OFF + IPV6_HLEN + 4;

/// An ICMP error (RFC 792, RFC 4443) that quotes a TCP or UDP packet: the outer addresses, and
/// the quoted packet's addresses and ports.
struct IcmpError<F: Family> {
    dst_mac: [u8; 6],
    src_mac: [u8; 6],
    saddr: F::Addr,
    daddr: F::Addr,
    inner_saddr: F::Addr,
    inner_daddr: F::Addr,
    inner_sport: u16,
    inner_dport: u16,
    inner_proto: u8,
}

/// Where a family's ICMP errors keep the quoted packet, and how a translation enters their
/// checksums.
trait IcmpFamily: Family {
    /// The quoted packet's source and destination addresses and its L4 header.
    const INNER_SRC_OFF: usize;
    const INNER_DST_OFF: usize;
    const INNER_L4_OFF: usize;

    /// Reads an ICMP error about a TCP or UDP packet (pulling its headers into the linear
    /// area); `None` for anything else, which stays the kernel's: other ICMP, options or
    /// extension headers on either header, a fragment, a quoted packet that is a later fragment
    /// (no ports) or is cut short.
    fn parse_icmp_error(ctx: &TcContext) -> Option<IcmpError<Self>>;

    /// Translates an ICMP error like the flow it quotes: one outer address (`outer_off`), and the
    /// same address and its port in the quoted packet (`inner_addr_off`, `inner_port_off`), with
    /// every checksum that covers them. The quoted L4 checksum is left as it was: it covers a
    /// datagram the error does not carry whole, and receivers do not check it.
    #[allow(clippy::too_many_arguments)]
    fn translate_icmp(
        ctx: &TcContext,
        outer_off: usize,
        inner_addr_off: usize,
        inner_port_off: usize,
        old_addr: Self::Addr,
        new_addr: Self::Addr,
        old_port: u16,
        new_port: u16,
    ) -> Result<(), i64>;
}

/// Pulls an ICMP error's headers through the quoted ports into the linear area; `None` when the
/// packet is shorter than that.
#[inline(always)]
fn pull_icmp(ctx: &TcContext, len: usize) -> Option<(usize, usize, usize)> {
    let wire_len = ctx.len() as usize;
    if wire_len < len {
        return None;
    }
    if ctx.data() + len > ctx.data_end() {
        let _ = ctx.pull_data(len as u32);
    }
    Some((ctx.data(), ctx.data_end(), wire_len))
}

impl IcmpFamily for V4 {
    const INNER_SRC_OFF: usize = INNER_IP_OFF + 12;
    const INNER_DST_OFF: usize = INNER_IP_OFF + 16;
    const INNER_L4_OFF: usize = INNER_IP_OFF + IPV4_HLEN;

    #[inline(always)]
    fn parse_icmp_error(ctx: &TcContext) -> Option<IcmpError<V4>> {
        let (start, end, wire_len) = pull_icmp(ctx, ICMP_PARSE_LEN)?;
        let eth = read_bytes::<14>(start, end, 0)?;
        if u16::from_be_bytes([eth[12], eth[13]]) != ETH_P_IP {
            return None;
        }
        let ip = read_bytes::<20>(start, end, ETH_HLEN)?;
        if ip[0] != 0x45 || ip[9] != PROTO_ICMP || u16::from_be_bytes([ip[6], ip[7]]) & 0x3fff != 0 {
            return None;
        }
        let tot_len = u16::from_be_bytes([ip[2], ip[3]]) as usize;
        if tot_len < ICMP_PARSE_LEN - ETH_HLEN || ETH_HLEN + tot_len > wire_len {
            return None;
        }
        let icmp = read_bytes::<1>(start, end, L4_OFF)?;
        // 3 destination unreachable (port unreachable, fragmentation needed, ...), 11 time
        // exceeded, 12 parameter problem.
        if !matches!(icmp[0], 3 | 11 | 12) {
            return None;
        }
        let inner = read_bytes::<20>(start, end, INNER_IP_OFF)?;
        let inner_proto = inner[9];
        if inner[0] != 0x45
            || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP)
            || u16::from_be_bytes([inner[6], inner[7]]) & 0x1fff != 0
        {
            return None;
        }
        let ports = read_bytes::<4>(start, end, Self::INNER_L4_OFF)?;
        Some(IcmpError {
            dst_mac: [eth[0], eth[1], eth[2], eth[3], eth[4], eth[5]],
            src_mac: [eth[6], eth[7], eth[8], eth[9], eth[10], eth[11]],
            saddr: u32::from_ne_bytes([ip[12], ip[13], ip[14], ip[15]]),
            daddr: u32::from_ne_bytes([ip[16], ip[17], ip[18], ip[19]]),
            inner_saddr: u32::from_ne_bytes([inner[12], inner[13], inner[14], inner[15]]),
            inner_daddr: u32::from_ne_bytes([inner[16], inner[17], inner[18], inner[19]]),
            inner_sport: u16::from_ne_bytes([ports[0], ports[1]]),
            inner_dport: u16::from_ne_bytes([ports[2], ports[3]]),
            inner_proto,
        })
    }

    /// The outer and the quoted IP checksums follow the address; the ICMP checksum, which
    /// covers the quoted packet, follows the port (the quoted IP header's own checksum change
    /// cancels its address change in that sum).
    #[inline(always)]
    fn translate_icmp(
        ctx: &TcContext,
        outer_off: usize,
        inner_addr_off: usize,
        inner_port_off: usize,
        old_addr: u32,
        new_addr: u32,
        old_port: u16,
        new_port: u16,
    ) -> Result<(), i64> {
        ctx.l3_csum_replace(IP_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(outer_off, &new_addr, 0)?;
        ctx.l3_csum_replace(INNER_CSUM_OFF, old_addr as u64, new_addr as u64, 4)?;
        ctx.store(inner_addr_off, &new_addr, 0)?;
        if old_port != new_port {
            ctx.l4_csum_replace(ICMP_CSUM_OFF, old_port as u64, new_port as u64, 2)?;
            ctx.store(inner_port_off, &new_port, 0)?;
        }
        Ok(())
    }
}

impl IcmpFamily for V6 {
    const INNER_SRC_OFF: usize = INNER6_IP_OFF + 8;
    const INNER_DST_OFF: usize = INNER6_IP_OFF + 24;
    const INNER_L4_OFF: usize = INNER6_IP_OFF + IPV6_HLEN;

    #[inline(always)]
    fn parse_icmp_error(ctx: &TcContext) -> Option<IcmpError<V6>> {
        let (start, end, wire_len) = pull_icmp(ctx, ICMP6_PARSE_LEN)?;
        if read::<u16>(start, end, 12)? != ETH_P_IPV6.to_be() {
            return None;
        }
        let fixed = read::<[u8; 8]>(start, end, ETH_HLEN)?;
        let payload_len = u16::from_be_bytes([fixed[4], fixed[5]]) as usize;
        if fixed[0] >> 4 != 6
            || fixed[6] != PROTO_ICMPV6
            || payload_len < ICMP6_PARSE_LEN - ICMP6_OFF
            || ICMP6_OFF + payload_len > wire_len
        {
            return None;
        }
        // RFC 4443: 1 destination unreachable (port unreachable among them), 2 packet too big,
        // 3 time exceeded, 4 parameter problem. Informational messages (128 and up: echo,
        // neighbour discovery) are never touched.
        if !matches!(read::<u8>(start, end, ICMP6_OFF)?, 1..=4) {
            return None;
        }
        let inner = read::<[u8; 8]>(start, end, INNER6_IP_OFF)?;
        let inner_proto = inner[6];
        if inner[0] >> 4 != 6 || (inner_proto != PROTO_TCP && inner_proto != PROTO_UDP) {
            return None;
        }
        let ports = read::<[u8; 4]>(start, end, Self::INNER_L4_OFF)?;
        Some(IcmpError {
            dst_mac: read(start, end, 0)?,
            src_mac: read(start, end, 6)?,
            saddr: read(start, end, IP6_SRC_OFF)?,
            daddr: read(start, end, IP6_DST_OFF)?,
            inner_saddr: read(start, end, Self::INNER_SRC_OFF)?,
            inner_daddr: read(start, end, Self::INNER_DST_OFF)?,
            inner_sport: u16::from_ne_bytes([ports[0], ports[1]]),
            inner_dport: u16::from_ne_bytes([ports[2], ports[3]]),
            inner_proto,
        })
    }

    /// The ICMPv6 checksum covers a pseudo-header with the outer addresses (RFC 4443 section
    /// 2.3) and, as its payload, the quoted packet, which has no header checksum of its own to
    /// cancel the change: it takes the outer address (as an L4 checksum does), the quoted
    /// address and the quoted port.
    #[inline(always)]
    fn translate_icmp(
        ctx: &TcContext,
        outer_off: usize,
        inner_addr_off: usize,
        inner_port_off: usize,
        old_addr: Addr6,
        new_addr: Addr6,
        old_port: u16,
        new_port: u16,
    ) -> Result<(), i64> {
        // The outer address, through the pseudo-header, as any IPv6 rewrite; then the quoted
        // one, as payload.
        V6::rewrite_addr(ctx, Some((ICMP6_CSUM_OFF, 0)), outer_off, old_addr, new_addr)?;
        ctx.l4_csum_replace(ICMP6_CSUM_OFF, 0, addr6_diff(&old_addr, &new_addr), 0)?;
        ctx.store(inner_addr_off, &new_addr, 0)?;
        if old_port != new_port {
            ctx.l4_csum_replace(ICMP6_CSUM_OFF, old_port as u64, new_port as u64, 2)?;
            ctx.store(inner_port_off, &new_port, 0)?;
        }
        Ok(())
    }
}

/// A translated ICMP error out of `ifindex` (the pod's link, or the uplink), counted on its port;
/// dropped and counted when the translation failed.
#[inline(always)]
fn send_icmp<F: Family>(
    ctx: &TcContext,
    translated: Result<(), i64>,
    slot: u32,
    ifindex: u32,
    was: (F::Addr, u16),
) -> i32 {
    if translated.is_err() {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        return TC_ACT_SHOT;
    }
    count(slot, |c| c.icmp_errors += 1);
    note::<F>(ctx, EVENT_ICMP_ERROR, slot, Some(was));
    // SAFETY: plain helper call; the FIB picks the next hop.
    unsafe { bpf_redirect_neigh(ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// An ICMP error from the LAN about a packet st8s sent as a frontend (a backend's reply: the
/// quoted packet goes from the frontend address and port to the client): to this node's pod
/// that sent it, translated back to the pod's own address and port; or, for a flow this node
/// forwarded, on to the node that serves it, unchanged but for the MACs (that node then
/// delivers it to its pod). Anything else stays the kernel's.
#[inline(always)]
fn icmp_to_backend<F: IcmpFamily>(ctx: &TcContext) -> Option<i32> {
    let e = F::parse_icmp_error(ctx)?;
    let cfg = config()?;
    if e.dst_mac != cfg.self_mac || e.inner_saddr != e.daddr {
        return None;
    }
    let port = port_info_of(e.inner_proto, e.inner_sport)?;
    let slot = port.slot as u32;
    let to_self = e.daddr == F::self_addr(cfg);
    if !to_self {
        // Another node's address: only that node's forward (a cluster node's MAC).
        let mac = MacKey {
            mac: e.src_mac,
            _pad: [0; 2],
        };
        // SAFETY: only existence is checked.
        if !F::is_node(e.daddr) || unsafe { ST8S_PEER_MACS.get(mac) }.is_none() {
            return None;
        }
    }
    if let Some(pod_addr) = F::pod_addr(&port).filter(|_| port.has_local != 0) {
        let key = F::rev_key(
            pod_addr,
            e.inner_daddr,
            port.local_port_be,
            e.inner_dport,
            e.inner_proto,
        );
        // SAFETY: copied out at once.
        if let Some(rev) = unsafe { F::revnat().get(&key) }.map(F::reply) {
            if rev.frontend == e.daddr && rev.frontend_port == e.inner_sport {
                let to_pod = F::translate_icmp(
                    ctx,
                    F::DST_OFF,
                    F::INNER_SRC_OFF,
                    F::INNER_L4_OFF,
                    e.daddr,
                    pod_addr,
                    e.inner_sport,
                    port.local_port_be,
                );
                return Some(send_icmp::<F>(
                    ctx,
                    to_pod,
                    slot,
                    port.local_ifindex,
                    (e.daddr, e.inner_sport),
                ));
            }
        }
    }
    if !to_self {
        return None;
    }
    let key = F::flow_key_of(e.inner_daddr, e.inner_dport, e.inner_sport, e.inner_proto);
    // SAFETY: copied out at once.
    let flow = unsafe { F::flows().get(&key) }.copied()?;
    if flow.kind != FLOW_REMOTE {
        return None;
    }
    let Some(Steer::Remote { slot, mac }) = still_valid(&flow, &port) else {
        return None;
    };
    let m = cfg.self_mac;
    let eth = [
        mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], m[0], m[1], m[2], m[3], m[4], m[5],
    ];
    if ctx.store(0, &eth, 0).is_err() {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        return Some(TC_ACT_SHOT);
    }
    count(slot, |c| c.icmp_errors += 1);
    note::<F>(ctx, EVENT_ICMP_ERROR, slot, None);
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(cfg.uplink_ifindex, 0) } as i32)
}

/// A backend pod's ICMP error about a packet st8s delivered to it (port unreachable: nothing
/// listens on the containerPort; fragmentation needed or packet too big; ...): it leaves as the
/// frontend the client sent to, quoting the packet as the client sent it, so the client's stack
/// matches it to its socket (a connected UDP socket sees ECONNREFUSED at once instead of a
/// timeout).
#[inline(always)]
fn icmp_from_backend<F: IcmpFamily>(ctx: &TcContext) -> Option<i32> {
    let e = F::parse_icmp_error(ctx)?;
    // The pod reports on a packet it received itself.
    if e.saddr != e.inner_daddr {
        return None;
    }
    let key = F::rev_key(
        e.inner_daddr,
        e.inner_saddr,
        e.inner_dport,
        e.inner_sport,
        e.inner_proto,
    );
    // SAFETY: copied out at once.
    let rev = unsafe { F::revnat().get(&key) }.map(F::reply)?;
    let cfg = config()?;
    let to_client = F::translate_icmp(
        ctx,
        F::SRC_OFF,
        F::INNER_DST_OFF,
        F::INNER_L4_OFF + 2,
        e.saddr,
        rev.frontend,
        e.inner_dport,
        rev.frontend_port,
    );
    Some(send_icmp::<F>(
        ctx,
        to_client,
        rev.slot as u32,
        cfg.uplink_ifindex,
        (e.saddr, e.inner_dport),
    ))
}

/// What a family's TC path returns when the packet was no TCP/UDP packet it could parse: the
/// entry point then tries it as an ICMP error, in a subprogram of its own (its stack frame does
/// not add to the TCP/UDP path's).
const TRY_ICMP: i32 = i32::MIN;
/// What a family's TC path returns for a UDP datagram to a group: the entry point hands it to
/// discovery, in a subprogram of its own for the same reason (IPv6 only; IPv4 fits inline).
const TRY_DISCOVERY: i32 = i32::MIN + 1;

/// An IPv6 datagram to a group from the LAN (see `TRY_DISCOVERY`), parsed again: the host
/// stack gets it, and a discovery pod a copy.
#[inline(never)]
fn discovery6_from_lan(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let run = || {
        let mut pkt = parse6_tc(&ctx)?;
        fragment_ports(&mut pkt, None)?;
        deliver_discovery(&ctx, &pkt, config()?);
        None
    };
    run().unwrap_or(TC_ACT_OK)
}

/// An IPv6 datagram to a group from a pod (see `TRY_DISCOVERY`): a discovery pod's leaves as
/// this node.
#[inline(never)]
fn discovery6_from_pod(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let run = || {
        let mut pkt = parse6_tc(&ctx)?;
        fragment_ports(&mut pkt, None)?;
        announce(&ctx, &pkt, config()?)
    };
    run().unwrap_or(TC_ACT_OK)
}

#[inline(never)]
fn icmp6_to_backend(skb: *mut __sk_buff) -> i32 {
    icmp_to_backend::<V6>(&TcContext::new(skb)).unwrap_or(TC_ACT_OK)
}

#[inline(never)]
fn icmp6_from_backend(skb: *mut __sk_buff) -> i32 {
    icmp_from_backend::<V6>(&TcContext::new(skb)).unwrap_or(TC_ACT_OK)
}

#[classifier]
pub fn st8s_uplink_tc(ctx: TcContext) -> i32 {
    // A frame of a VLAN whose tag the kernel (or the NIC) already took off into the skb belongs
    // to that VLAN's subinterface, which gets it after this program: not this interface's LAN.
    // SAFETY: a read of this program's own __sk_buff.
    if unsafe { (*ctx.skb.skb).vlan_present } != 0 {
        return TC_ACT_OK;
    }
    // One subprogram per family, as in `st8s_uplink_xdp`.
    let skb = ctx.skb.skb;
    tc_monitored(skb, || {
        if is_ipv6_frame(ctx.data(), ctx.data_end()) {
            match uplink_tc6(skb) {
                TRY_ICMP => icmp6_to_backend(skb),
                TRY_DISCOVERY => discovery6_from_lan(skb),
                verdict => verdict,
            }
        } else {
            uplink_tc4(skb)
        }
    })
}

/// Pulls the first `len` bytes (or the whole packet, if shorter) into the linear area, if they
/// are not there yet. A short packet (a fragment's tail) may be all header.
#[inline(always)]
fn pull_headers(ctx: &TcContext, len: usize) {
    let wire_len = ctx.len() as usize;
    if ctx.data() + len > ctx.data_end() && wire_len > ETH_HLEN {
        let _ = ctx.pull_data(wire_len.min(len) as u32);
    }
}

/// Parses an IPv4 TC packet.
#[inline(always)]
fn parse_tc(ctx: &TcContext) -> Option<Packet<V4>> {
    pull_headers(ctx, PARSE_LEN);
    parse(ctx.data(), ctx.data_end(), ctx.len() as usize)
}

/// Parses an IPv6 TC packet; one with more extension headers than st8s walks is counted. (The
/// XDP program leaves such packets to this one, which counts them once.)
#[inline(always)]
fn parse6_tc(ctx: &TcContext) -> Option<Packet<V6>> {
    pull_headers(ctx, PARSE_LEN6);
    match parse6(ctx.data(), ctx.data_end(), ctx.len() as usize) {
        Ok(p) => Some(p),
        Err(Skip6::TooManyHeaders) => {
            count(GLOBAL_COUNTER_SLOT, |c| c.ext_headers += 1);
            None
        }
        Err(Skip6::Other) => None,
    }
}

/// Whether the frame carries IPv6 (the Ethernet header is always in the linear area).
#[inline(always)]
fn is_ipv6_frame(start: usize, end: usize) -> bool {
    read::<u16>(start, end, 12) == Some(ETH_P_IPV6.to_be())
}

#[inline(never)]
fn uplink_tc4(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let run = || {
        let Some(mut pkt) = parse_tc(&ctx) else {
            return icmp_to_backend::<V4>(&ctx);
        };
        fragment_ports(&mut pkt, Some(&ctx))?;
        let cfg = config()?;
        if pkt.proto == PROTO_UDP && is_group_or_broadcast(pkt.daddr, cfg) {
            deliver_discovery(&ctx, &pkt, cfg);
            // The host stack gets the original either way.
            return None;
        }
        uplink_steer(&ctx, &pkt, cfg)
    };
    run().unwrap_or(TC_ACT_OK)
}

#[inline(never)]
fn uplink_tc6(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let Some(mut pkt) = parse6_tc(&ctx) else {
        return TRY_ICMP;
    };
    if pkt.proto == PROTO_UDP && is_multicast6(pkt.daddr) {
        return TRY_DISCOVERY;
    }
    let mut run = || {
        fragment_ports(&mut pkt, Some(&ctx))?;
        uplink_steer(&ctx, &pkt, config()?)
    };
    run().unwrap_or(TC_ACT_OK)
}

/// The uplink's verdict on a parsed packet, and the act.
#[inline(always)]
fn uplink_steer<F: Family>(ctx: &TcContext, pkt: &Packet<F>, cfg: &Config) -> Option<i32> {
    match steer(pkt, cfg) {
        Steer::NotOurs => {
            forget_stale_reply_translation(pkt);
            None
        }
        Steer::Pass { slot, untrusted } => {
            if untrusted {
                count(slot, |c| c.untrusted_peer += 1);
                note::<F>(ctx, EVENT_UNTRUSTED_PEER, slot, None);
            } else {
                count(slot, |c| c.passed += 1);
                note::<F>(ctx, EVENT_PASSED, slot, None);
            }
            None
        }
        Steer::DropNoLocal { slot } => {
            count(slot, |c| c.drop_no_local_backend += 1);
            note::<F>(ctx, EVENT_DROP_NO_LOCAL_BACKEND, slot, None);
            Some(TC_ACT_SHOT)
        }
        Steer::Remote { slot, mac } => {
            follow_fragments(pkt, slot);
            let m = cfg.self_mac;
            let eth = [
                mac[0], mac[1], mac[2], mac[3], mac[4], mac[5], m[0], m[1], m[2], m[3], m[4], m[5],
            ];
            if ctx.store(0, &eth, 0).is_err() {
                count(slot, |c| c.drop_error += 1);
                note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
                return Some(TC_ACT_SHOT);
            }
            // SAFETY: plain helper call.
            let rc = unsafe { bpf_redirect(cfg.uplink_ifindex, 0) };
            count(slot, |c| c.forwarded += 1);
            note::<F>(ctx, EVENT_FORWARDED, slot, None);
            Some(rc as i32)
        }
        Steer::Local { port, established } => Some(deliver_local(ctx, pkt, &port, established)),
    }
}

/// Limited broadcast, the uplink subnet's broadcast, or any IPv4 multicast group.
#[inline(always)]
fn is_group_or_broadcast(daddr_be: u32, cfg: &Config) -> bool {
    let first_octet = daddr_be & 0xff;
    daddr_be == u32::MAX
        || first_octet & 0xf0 == 0xe0
        || (cfg.broadcast_be != 0 && daddr_be == cfg.broadcast_be)
}

/// What discovery needs of an address family: where a copy for the pod goes, whose answers can
/// come back, and who announcements leave as.
trait DiscoveryFamily: Family {
    /// The discovery pod's address in the family, if it has one.
    fn discovery_pod(d: &Discovery) -> Option<Self::Addr>;
    /// The destination address and MAC of the pod's copy of a datagram to the group `daddr`,
    /// whose frame went to `dst_mac`.
    fn copy_to(daddr: Self::Addr, dst_mac: [u8; 6], cfg: &Config) -> (Self::Addr, [u8; 6]);
    /// Whether the pod's unicast answer to `asker` can leave the pod (not a link-local address,
    /// which is on the LAN's link, not the pod's).
    fn answerable(asker: Self::Addr) -> bool;
    /// The discovery pod a datagram from the pod side came from.
    fn announcer(pkt: &Packet<Self>) -> Option<Discovery>;
    /// The source an announcement from `saddr` leaves the node with, if the node has one.
    fn announce_from(saddr: Self::Addr, cfg: &Config) -> Option<Self::Addr>;
}

impl DiscoveryFamily for V4 {
    #[inline(always)]
    fn discovery_pod(d: &Discovery) -> Option<u32> {
        Some(d.pod_addr_be)
    }
    /// The pod's subnet is not the LAN's: a LAN-subnet broadcast means nothing there, and
    /// becomes 255.255.255.255. The frame goes to the matching broadcast or multicast MAC.
    #[inline(always)]
    fn copy_to(daddr: u32, _dst_mac: [u8; 6], cfg: &Config) -> (u32, [u8; 6]) {
        let to = if daddr == cfg.broadcast_be {
            u32::MAX
        } else {
            daddr
        };
        (to, group_mac(to))
    }
    #[inline(always)]
    fn answerable(_asker: u32) -> bool {
        true
    }
    #[inline(always)]
    fn announcer(pkt: &Packet<V4>) -> Option<Discovery> {
        let key = DiscoveryPodKey {
            pod_addr_be: pkt.saddr,
            pod_port_be: pkt.sport,
            _pad: 0,
        };
        // SAFETY: copied out at once.
        unsafe { ST8S_DISCOVERY_PODS.get(key) }.copied()
    }
    #[inline(always)]
    fn announce_from(_saddr: u32, cfg: &Config) -> Option<u32> {
        Some(cfg.self_addr_be)
    }
}

impl DiscoveryFamily for V6 {
    #[inline(always)]
    fn discovery_pod(d: &Discovery) -> Option<Addr6> {
        some_addr6(d.pod_addr6)
    }
    /// The group and its MAC (33:33 and the group's low 32 bits, RFC 2464 section 7) as they
    /// came: the same on the pod's link.
    #[inline(always)]
    fn copy_to(daddr: Addr6, dst_mac: [u8; 6], _cfg: &Config) -> (Addr6, [u8; 6]) {
        (daddr, dst_mac)
    }
    /// A LAN host asks from its link-local address (fe80::/10) when the group is link-scoped
    /// (RFC 6724's source selection): the pod cannot reach that address, so only its multicast
    /// answers reach such an asker.
    #[inline(always)]
    fn answerable(asker: Addr6) -> bool {
        !is_link_local6(asker)
    }
    #[inline(always)]
    fn announcer(pkt: &Packet<V6>) -> Option<Discovery> {
        let key = DiscoveryPodKey6 {
            mac: pkt.src_mac,
            pod_port_be: pkt.sport,
        };
        // SAFETY: copied out at once.
        unsafe { ST8S_DISCOVERY_PODS6.get(key) }.copied()
    }
    /// A pod's link-scope multicast comes from its own link-local address and leaves from the
    /// uplink's; from any other address it leaves as the node's IPv6 address.
    #[inline(always)]
    fn announce_from(saddr: Addr6, cfg: &Config) -> Option<Addr6> {
        some_addr6(if is_link_local6(saddr) {
            cfg.self_ll6
        } else {
            cfg.self_addr6
        })
    }
}

/// An IPv6 address from a map, `None` when all zeros (the maps' "none").
#[inline(always)]
fn some_addr6(a: Addr6) -> Option<Addr6> {
    (a[0] | a[1] | a[2] | a[3] != 0).then_some(a)
}

/// Any IPv6 multicast group (ff00::/8): mDNS's ff02::fb, SSDP's ff02::c and ff05::c.
#[inline(always)]
fn is_multicast6(a: Addr6) -> bool {
    a[0] & 0xff == 0xff
}

/// fe80::/10, with the address as it sits in the packet.
#[inline(always)]
fn is_link_local6(a: Addr6) -> bool {
    let b = a[0].to_ne_bytes();
    b[0] == 0xfe && b[1] & 0xc0 == 0x80
}

/// A broadcast or multicast datagram to a discovery port: a copy goes to the local pod that
/// declares the port, as a LAN host on the pod's own link would receive it: still addressed to
/// the broadcast or the group (see [`DiscoveryFamily::copy_to`]), with its IP TTL or hop limit
/// untouched (mDNS wants 255, RFC 6762 section 11). So a socket bound to 255.255.255.255 or to
/// 0.0.0.0, or joined to the group, receives it, as real servers bind (Jellyfin, avahi, SSDP
/// stacks). The pod sees the asker's own address, and its answer to the asker leaves as this
/// node (REVNAT). The copy is transmitted on the pod's link (the host side of its veth); the
/// original is put back as it was for the host stack.
#[inline(always)]
fn deliver_discovery<F: DiscoveryFamily>(ctx: &TcContext, pkt: &Packet<F>, cfg: &Config) {
    // SAFETY: copied out at once.
    let Some(d) = (unsafe { ST8S_DISCOVERY.get(u16::from_be(pkt.dport) as u32) }).copied() else {
        return;
    };
    let Some(pod_addr) = F::discovery_pod(&d) else {
        return;
    };
    let slot = d.slot as u32;
    if F::answerable(pkt.saddr) {
        let rev_key = F::rev_key(pod_addr, pkt.saddr, d.pod_port_be, pkt.sport, PROTO_UDP);
        // SAFETY: plain helper call.
        let rev = F::rev_value(F::self_addr(cfg), pkt.dport, d.slot, unsafe {
            bpf_ktime_get_ns()
        });
        if F::revnat().insert(&rev_key, rev, 0).is_err() {
            count(slot, |c| c.drop_error += 1);
            note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
            return;
        }
    }
    let Ok(dst_mac) = ctx.load::<[u8; 6]>(0) else {
        return;
    };
    let (to_addr, to_mac) = F::copy_to(pkt.daddr, dst_mac, cfg);
    let port_off = pkt.l4_off + 2;
    let to_pod = rewrite(
        ctx,
        pkt,
        F::DST_OFF,
        pkt.daddr,
        to_addr,
        port_off,
        pkt.dport,
        d.pod_port_be,
    )
    .and_then(|()| ctx.store(0, &to_mac, 0));
    // SAFETY: plain helper call on this program's own skb; egress on the pod's link.
    let cloned = to_pod.is_ok() && unsafe { bpf_clone_redirect(ctx.skb.skb, d.ifindex, 0) } == 0;
    let restored = ctx.store(0, &dst_mac, 0).and_then(|()| {
        rewrite(
            ctx,
            pkt,
            F::DST_OFF,
            to_addr,
            pkt.daddr,
            port_off,
            d.pod_port_be,
            pkt.dport,
        )
    });
    if cloned && restored.is_ok() {
        follow_fragments(pkt, slot);
        count(slot, |c| c.discovered += 1);
        note::<F>(ctx, EVENT_DISCOVERED, slot, Some((pod_addr, d.pod_port_be)));
    } else {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
    }
}

/// The Ethernet destination of an IPv4 broadcast (all ones) or multicast group (01:00:5e and
/// the group's low 23 bits, RFC 1112 section 6.4).
#[inline(always)]
fn group_mac(daddr_be: u32) -> [u8; 6] {
    if daddr_be == u32::MAX {
        return [0xff; 6];
    }
    let b = daddr_be.to_ne_bytes();
    [0x01, 0x00, 0x5e, b[1] & 0x7f, b[2], b[3]]
}

/// A discovery pod's own broadcast or multicast (an announcement, or a multicast answer): it
/// leaves by the uplink as this node (address, hostPort and MAC), as a LAN host's would.
#[inline(always)]
fn announce<F: DiscoveryFamily>(ctx: &TcContext, pkt: &Packet<F>, cfg: &Config) -> Option<i32> {
    let d = F::announcer(pkt)?;
    let slot = d.slot as u32;
    let Some(from) = F::announce_from(pkt.saddr, cfg) else {
        count(slot, |c| c.passed += 1);
        note::<F>(ctx, EVENT_PASSED, slot, None);
        return None;
    };
    let ok = rewrite(
        ctx,
        pkt,
        F::SRC_OFF,
        pkt.saddr,
        from,
        pkt.l4_off,
        pkt.sport,
        d.host_port_be,
    )
    .and_then(|()| ctx.store(6, &cfg.self_mac, 0));
    if ok.is_err() {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        return Some(TC_ACT_SHOT);
    }
    follow_fragments(pkt, slot);
    count(slot, |c| c.replied += 1);
    note::<F>(ctx, EVENT_ANNOUNCED, slot, Some((pkt.saddr, pkt.sport)));
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect(cfg.uplink_ifindex, 0) } as i32)
}

const TCP_SYN: u8 = 0x02;
const TCP_ACK: u8 = 0x10;

/// A new TCP connection that st8s does not steer may reuse the 4-tuple of an earlier steered one
/// (a client talking to the pod's address directly, from a recycled port): its reply must not be
/// rewritten to the old frontend, so the old reply translation goes.
#[inline(always)]
fn forget_stale_reply_translation<F: Family>(pkt: &Packet<F>) {
    if is_syn(pkt) {
        let key = F::rev_key(pkt.daddr, pkt.saddr, pkt.dport, pkt.sport, pkt.proto);
        let _ = F::revnat().remove(&key);
    }
}

/// A TCP segment that opens a connection (SYN without ACK).
#[inline(always)]
fn is_syn<F: Family>(pkt: &Packet<F>) -> bool {
    pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN
}

/// The reply translation under `key`, if there and naming the frontend this packet was sent to.
#[inline(always)]
fn live_translation<F: Family>(pkt: &Packet<F>, key: &F::RevKey) -> Option<*mut F::RevValue> {
    let v = F::revnat().get_ptr_mut(key)?;
    // SAFETY: LRU values stay valid for the duration of the program run.
    let r = F::reply(unsafe { &*v });
    (r.frontend == pkt.daddr && r.frontend_port == pkt.dport).then_some(v)
}

/// Re-stamps a live reply translation for a packet that must (a TCP SYN, every UDP datagram).
#[inline(always)]
fn restamp<F: Family>(pkt: &Packet<F>, v: *mut F::RevValue) {
    if is_syn(pkt) || pkt.proto == PROTO_UDP {
        // SAFETY: `v` is an LRU value from this program run (see `live_translation`).
        unsafe { *F::stamp(&mut *v) = bpf_ktime_get_ns() };
    }
}

/// Makes sure the reply translation of a flow delivered to `pod` is in place, naming the
/// frontend the client sent to; false when it could not be written. The stamp proves that a
/// reply belongs to a flow st8s delivered: a TCP SYN (re)stamps it, and every UDP datagram
/// does; the pod program refuses stale stamps (see `reply_is_ours`).
#[inline(always)]
fn reply_translation<F: Family>(pkt: &Packet<F>, port: &PortInfo, pod: F::Addr) -> bool {
    let rev_key = F::rev_key(pod, pkt.saddr, port.local_port_be, pkt.sport, pkt.proto);
    match live_translation(pkt, &rev_key) {
        Some(v) => {
            restamp(pkt, v);
            true
        }
        None => {
            // SAFETY: plain helper call.
            let rev = F::rev_value(pkt.daddr, pkt.dport, port.slot, unsafe { bpf_ktime_get_ns() });
            F::revnat().insert(&rev_key, rev, 0).is_ok()
        }
    }
}

/// DNAT to the local backend pod, remember how to translate its replies, and hand the packet to
/// the pod's interface with `bpf_redirect_neigh` (no routing, no netfilter on the way).
#[inline(always)]
fn deliver_local<F: Family>(ctx: &TcContext, pkt: &Packet<F>, port: &PortInfo, established: bool) -> i32 {
    let slot = port.slot as u32;
    // `steer` never delivers to a pod without an address in the family.
    let Some(pod_addr) = F::pod_addr(port) else {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        return TC_ACT_SHOT;
    };
    if !established && !reply_translation(pkt, port, pod_addr) {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        // The flow entry `steer` may just have written would otherwise mark the flow as
        // established while it has no reply translation.
        let _ = F::flows().remove(F::flow_key(pkt));
        return TC_ACT_SHOT;
    }
    if rewrite(
        ctx,
        pkt,
        F::DST_OFF,
        pkt.daddr,
        pod_addr,
        pkt.l4_off + 2,
        pkt.dport,
        port.local_port_be,
    )
    .is_err()
    {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        return TC_ACT_SHOT;
    }
    follow_fragments(pkt, slot);
    count(slot, |c| c.delivered_local += 1);
    note::<F>(ctx, EVENT_LOCAL, slot, Some((pkt.daddr, pkt.dport)));
    // Straight into the pod, when the agent knows its own link: this program runs at the
    // uplink's ingress, where `bpf_redirect_peer` may hand a packet to a veth's peer.
    if let Some(link) = ST8S_POD_LINKS.get(slot) {
        let (start, end) = (ctx.data(), ctx.data_end());
        if link.ifindex != 0 && link.pod_addr_be == port.local_addr_be && start + 6 <= end {
            // The frame addressed to the pod, written in place: the rewrite above has made the
            // packet writable, and a helper call here would cost about what the lookups do.
            // Three 16-bit stores (a frame starts 2-byte aligned): a 6-byte copy would be a call
            // to a byte loop.
            let m = link.pod_mac;
            let dst = start as *mut u16;
            // SAFETY: the 6 bytes are inside the packet (checked against `data_end`).
            unsafe {
                *dst = u16::from_ne_bytes([m[0], m[1]]);
                *dst.add(1) = u16::from_ne_bytes([m[2], m[3]]);
                *dst.add(2) = u16::from_ne_bytes([m[4], m[5]]);
            }
            // SAFETY: plain helper call.
            return unsafe { bpf_redirect_peer(link.ifindex, 0) as i32 };
        }
    }
    // SAFETY: plain helper call; no neighbour parameters, the FIB picks the next hop.
    unsafe { bpf_redirect_neigh(port.local_ifindex, core::ptr::null_mut(), 0, 0) as i32 }
}

/// Rewrites one address and one port, fixing the checksums that cover them. A fragment after
/// the first (`pkt.frag`) has no L4 header: only its address changes (the first fragment's L4
/// checksum already accounts for the address, and the ports are in the first fragment only).
#[allow(clippy::too_many_arguments)]
#[inline(always)]
fn rewrite<F: Family>(
    ctx: &TcContext,
    pkt: &Packet<F>,
    addr_off: usize,
    old_addr: F::Addr,
    new_addr: F::Addr,
    port_off: usize,
    old_port: u16,
    new_port: u16,
) -> Result<(), i64> {
    let (csum_off, mangled) = if pkt.proto == PROTO_TCP {
        (pkt.l4_off + 16, 0)
    } else {
        (pkt.l4_off + 6, BPF_F_MARK_MANGLED_0)
    };
    let l4 = pkt.frag != FRAG_LATER;
    F::rewrite_addr(
        ctx,
        l4.then_some((csum_off, mangled)),
        addr_off,
        old_addr,
        new_addr,
    )?;
    if l4 && old_port != new_port {
        ctx.l4_csum_replace(csum_off, old_port as u64, new_port as u64, mangled | 2)?;
        ctx.store(port_off, &new_port, 0)?;
    }
    Ok(())
}

/// TCP: a SYN-ACK answers a SYN st8s delivered only if that SYN was stamped moments ago.
/// UDP: the entry lives while datagrams keep flowing through st8s.
const SYN_ACK_WINDOW_NS: u64 = 10_000_000_000;
const UDP_IDLE_NS: u64 = 60_000_000_000;

#[inline(always)]
fn reply_is_ours<F: Family>(pkt: &Packet<F>, stamp_ns: u64) -> bool {
    let syn_ack = pkt.proto == PROTO_TCP && pkt.tcp_flags & (TCP_SYN | TCP_ACK) == TCP_SYN | TCP_ACK;
    if !syn_ack && pkt.proto == PROTO_TCP {
        return true;
    }
    // SAFETY: plain helper call.
    let now = unsafe { bpf_ktime_get_ns() };
    let window = if syn_ack { SYN_ACK_WINDOW_NS } else { UDP_IDLE_NS };
    now.wrapping_sub(stamp_ns) <= window
}

#[classifier]
pub fn st8s_pod_tc(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    tc_monitored(skb, || {
        if is_ipv6_frame(ctx.data(), ctx.data_end()) {
            match pod_tc6(skb) {
                TRY_ICMP => icmp6_from_backend(skb),
                TRY_DISCOVERY => discovery6_from_pod(skb),
                verdict => verdict,
            }
        } else {
            pod_tc4(skb)
        }
    })
}

/// The pod program's IPv4 path, a subprogram too: inline, its frame would count against the
/// IPv6 path's (512 bytes for the whole call chain).
#[inline(never)]
fn pod_tc4(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let run = || {
        if let Some(mut pkt) = parse_tc(&ctx) {
            fragment_ports(&mut pkt, Some(&ctx))?;
            if pkt.proto == PROTO_UDP {
                let cfg = config()?;
                if is_group_or_broadcast(pkt.daddr, cfg) {
                    return announce(&ctx, &pkt, cfg);
                }
            }
            return pod_reply(&ctx, &pkt);
        }
        icmp_from_backend::<V4>(&ctx)
    };
    run().unwrap_or(TC_ACT_OK)
}

/// The pod program's IPv6 path, a subprogram as in `st8s_uplink_xdp`.
#[inline(never)]
fn pod_tc6(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let Some(mut pkt) = parse6_tc(&ctx) else {
        return TRY_ICMP;
    };
    if pkt.proto == PROTO_UDP && is_multicast6(pkt.daddr) {
        return TRY_DISCOVERY;
    }
    let mut run = || {
        fragment_ports(&mut pkt, Some(&ctx))?;
        pod_reply(&ctx, &pkt)
    };
    run().unwrap_or(TC_ACT_OK)
}

/// The pod program's reply half, on a local backend pod's own bridge port (the host side of its
/// link; the agent attaches it where the pod network is a bridge). TC ingress there runs before
/// the bridge takes the frame, so a translated reply goes to the uplink without crossing the
/// bridge and, where br_netfilter is loaded (Kubernetes nodes load it), without the iptables and
/// conntrack pass the bridge gives every frame: a steered flow's SYN never met conntrack, so its
/// SYN-ACK made a new entry there for every connection. Everything else (discovery, ICMP errors,
/// the pod's other traffic) goes on to the bridge, whose `st8s_pod_tc` handles it as before.
#[classifier]
pub fn st8s_pod_port_tc(ctx: TcContext) -> i32 {
    let skb = ctx.skb.skb;
    tc_monitored(skb, || {
        if is_ipv6_frame(ctx.data(), ctx.data_end()) {
            pod_port_tc6(skb)
        } else {
            pod_port_tc4(skb)
        }
    })
}

/// `st8s_pod_port_tc` for IPv4, a subprogram as `pod_tc4` is. Fragments the flow tables do not
/// know are not counted here: the bridge's program counts them.
#[inline(never)]
fn pod_port_tc4(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let run = || {
        let mut pkt = parse_tc(&ctx)?;
        fragment_ports(&mut pkt, None)?;
        if pkt.proto == PROTO_UDP && is_group_or_broadcast(pkt.daddr, config()?) {
            return None;
        }
        pod_reply(&ctx, &pkt)
    };
    run().unwrap_or(TC_ACT_OK)
}

/// `st8s_pod_port_tc` for IPv6.
#[inline(never)]
fn pod_port_tc6(skb: *mut __sk_buff) -> i32 {
    let ctx = TcContext::new(skb);
    let run = || {
        let mut pkt = parse6_tc(&ctx)?;
        if pkt.proto == PROTO_UDP && is_multicast6(pkt.daddr) {
            return None;
        }
        fragment_ports(&mut pkt, None)?;
        pod_reply(&ctx, &pkt)
    };
    run().unwrap_or(TC_ACT_OK)
}

/// A backend's reply to a flow st8s delivered: from the frontend the client sent to, straight
/// out of the uplink.
#[inline(always)]
fn pod_reply<F: Family>(ctx: &TcContext, pkt: &Packet<F>) -> Option<i32> {
    let key = F::rev_key(pkt.saddr, pkt.daddr, pkt.sport, pkt.dport, pkt.proto);
    // SAFETY: copied out at once.
    let rev = F::reply(unsafe { F::revnat().get(&key)? });
    if !reply_is_ours(pkt, rev.stamp_ns) {
        // A new connection (or UDP exchange) that reached the pod another way, reusing the
        // 4-tuple of an old steered one: not ours to rewrite, and the old entry is dead.
        let _ = F::revnat().remove(&key);
        return None;
    }
    let cfg = config()?;
    let slot = rev.slot as u32;
    if rewrite(
        ctx,
        pkt,
        F::SRC_OFF,
        pkt.saddr,
        rev.frontend,
        pkt.l4_off,
        pkt.sport,
        rev.frontend_port,
    )
    .is_err()
    {
        count(slot, |c| c.drop_error += 1);
        note::<F>(ctx, EVENT_DROP_ERROR, slot, None);
        return Some(TC_ACT_SHOT);
    }
    follow_fragments(pkt, slot);
    count(slot, |c| c.replied += 1);
    note::<F>(ctx, EVENT_REPLIED, slot, Some((pkt.saddr, pkt.sport)));
    // Straight out of the uplink to the client, whichever node the client addressed.
    // SAFETY: plain helper call.
    Some(unsafe { bpf_redirect_neigh(cfg.uplink_ifindex, core::ptr::null_mut(), 0, 0) as i32 })
}

#[xdp]
pub fn st8s_xdp_pass(_ctx: XdpContext) -> u32 {
    xdp_action::XDP_PASS
}

/// Benchmark baseline: the same header parsing as the uplink programs, then `XDP_PASS`. Every
/// parsed field feeds the verdict so that the parse cannot be optimised away.
#[xdp]
pub fn st8s_parse_only_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    match parse(start, end, end - start) {
        Some(p) if uses_every_field(&p) => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

/// Benchmark baseline for the TC programs: parse, then `TC_ACT_OK`.
#[classifier]
pub fn st8s_parse_only_tc(ctx: TcContext) -> i32 {
    match parse_tc(&ctx) {
        Some(p) if uses_every_field(&p) => TC_ACT_SHOT,
        _ => TC_ACT_OK,
    }
}

/// Never true for a real packet, but it reads every parsed field, so that the compiler cannot
/// drop the reads a steering program needs (it dropped all but the ports before).
#[inline(always)]
fn uses_every_field(p: &Packet<V4>) -> bool {
    let mac = u32::from_ne_bytes([p.src_mac[0], p.src_mac[1], p.src_mac[2], p.src_mac[3]])
        ^ u32::from_ne_bytes([p.src_mac[4], p.src_mac[5], p.tcp_flags, p.proto])
        ^ u32::from_ne_bytes([p.dst_mac[0], p.dst_mac[1], p.dst_mac[2], p.dst_mac[3]])
        ^ u32::from_ne_bytes([p.dst_mac[4], p.dst_mac[5], 0, 0]);
    p.saddr ^ p.daddr ^ mac ^ ((p.sport as u32) << 16 | p.dport as u32) == 0xffff_ffff
}

/// Benchmark reference: the parse plus one `ST8S_FLOWS` lookup and nothing else. It is the floor
/// of any design that tracks connections in a kernel hash table, as Katran and Cilium do.
#[xdp]
pub fn st8s_parse_lookup_xdp(ctx: XdpContext) -> u32 {
    let (start, end) = (ctx.data(), ctx.data_end());
    let Some(p) = parse(start, end, end - start) else {
        return xdp_action::XDP_PASS;
    };
    // SAFETY: only existence is checked.
    match unsafe { ST8S_FLOWS.get(V4::flow_key(&p)) } {
        Some(_) if uses_every_field(&p) => xdp_action::XDP_DROP,
        _ => xdp_action::XDP_PASS,
    }
}

// Socket-level steering: clients on the node itself. Their packets never cross the uplink's
// ingress, so the TC and XDP programs never see them; instead the destination is chosen once per
// socket, where the application names it (as Cilium's socket-level load balancing does): at
// connect() for TCP and connected UDP, at each sendmsg() for unconnected UDP. recvmsg() and
// getpeername() then show the address the application used, so nothing in the application sees
// the backend. Every program returns 1 (allow): steering never refuses a socket call.

#[cgroup_sock_addr(connect4)]
pub fn st8s_sock_connect4(ctx: SockAddrContext) -> i32 {
    sock_steer::<V4>(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg4)]
pub fn st8s_sock_sendmsg4(ctx: SockAddrContext) -> i32 {
    sock_steer::<V4>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg4)]
pub fn st8s_sock_recvmsg4(ctx: SockAddrContext) -> i32 {
    sock_unsteer::<V4>(&ctx);
    1
}

#[cgroup_sock_addr(getpeername4)]
pub fn st8s_sock_getpeername4(ctx: SockAddrContext) -> i32 {
    sock_unsteer::<V4>(&ctx);
    1
}

#[cgroup_sock_addr(connect6)]
pub fn st8s_sock_connect6(ctx: SockAddrContext) -> i32 {
    sock_steer::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(sendmsg6)]
pub fn st8s_sock_sendmsg6(ctx: SockAddrContext) -> i32 {
    sock_steer::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(recvmsg6)]
pub fn st8s_sock_recvmsg6(ctx: SockAddrContext) -> i32 {
    sock_unsteer::<V6>(&ctx);
    1
}

#[cgroup_sock_addr(getpeername6)]
pub fn st8s_sock_getpeername6(ctx: SockAddrContext) -> i32 {
    sock_unsteer::<V6>(&ctx);
    1
}

/// The socket side of a family: where the hooks read and write the address the application
/// named, how they remember it, and where a remote backend node takes connections.
trait SockFamily: Family {
    type SockKey: 'static;
    type SockValue: Copy + 'static;
    fn sock_revnat() -> &'static LruHashMap<Self::SockKey, Self::SockValue>;
    fn sock_key(cookie: u64, backend: Self::Addr, backend_port: u16) -> Self::SockKey;
    fn sock_value(frontend: Self::Addr, frontend_port: u16) -> Self::SockValue;
    fn sock_frontend(v: &Self::SockValue) -> (Self::Addr, u16);
    /// # Safety
    /// `sa` is the hook's own `bpf_sock_addr`.
    unsafe fn user_addr(sa: *const bpf_sock_addr) -> Self::Addr;
    /// # Safety
    /// As [`SockFamily::user_addr`].
    unsafe fn set_user_addr(sa: *mut bpf_sock_addr, addr: Self::Addr);
    /// A backend node's address in the family, if it has one.
    fn node_addr(b: &Backend) -> Option<Self::Addr>;
    /// The address as one word for the socket hash.
    fn hash_word(addr: Self::Addr) -> u32;
}

impl SockFamily for V4 {
    type SockKey = SockRevNatKey;
    type SockValue = SockRevNatValue;
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey, SockRevNatValue> {
        &ST8S_SOCK_REVNAT
    }
    #[inline(always)]
    fn sock_key(cookie: u64, backend: u32, backend_port: u16) -> SockRevNatKey {
        SockRevNatKey {
            cookie,
            backend_addr_be: backend,
            backend_port_be: backend_port,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn sock_value(frontend: u32, frontend_port: u16) -> SockRevNatValue {
        SockRevNatValue {
            frontend_addr_be: frontend,
            frontend_port_be: frontend_port,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn sock_frontend(v: &SockRevNatValue) -> (u32, u16) {
        (v.frontend_addr_be, v.frontend_port_be)
    }
    #[inline(always)]
    unsafe fn user_addr(sa: *const bpf_sock_addr) -> u32 {
        // SAFETY: the caller's.
        unsafe { (*sa).user_ip4 }
    }
    #[inline(always)]
    unsafe fn set_user_addr(sa: *mut bpf_sock_addr, addr: u32) {
        // SAFETY: the caller's.
        unsafe { (*sa).user_ip4 = addr };
    }
    #[inline(always)]
    fn node_addr(b: &Backend) -> Option<u32> {
        Some(b.node_addr_be)
    }
    #[inline(always)]
    fn hash_word(addr: u32) -> u32 {
        addr
    }
}

impl SockFamily for V6 {
    type SockKey = SockRevNatKey6;
    type SockValue = SockRevNatValue6;
    #[inline(always)]
    fn sock_revnat() -> &'static LruHashMap<SockRevNatKey6, SockRevNatValue6> {
        &ST8S_SOCK_REVNAT6
    }
    #[inline(always)]
    fn sock_key(cookie: u64, backend: Addr6, backend_port: u16) -> SockRevNatKey6 {
        SockRevNatKey6 {
            cookie,
            backend_addr: backend,
            backend_port_be: backend_port,
            _pad: 0,
            _pad2: 0,
        }
    }
    #[inline(always)]
    fn sock_value(frontend: Addr6, frontend_port: u16) -> SockRevNatValue6 {
        SockRevNatValue6 {
            frontend_addr: frontend,
            frontend_port_be: frontend_port,
            _pad: 0,
        }
    }
    #[inline(always)]
    fn sock_frontend(v: &SockRevNatValue6) -> (Addr6, u16) {
        (v.frontend_addr, v.frontend_port_be)
    }
    /// Word by word: the kernel takes `user_ip6` in 4-byte accesses (wider ones only aligned,
    /// and only on newer kernels), which volatile reads and writes keep LLVM from merging.
    #[inline(always)]
    unsafe fn user_addr(sa: *const bpf_sock_addr) -> Addr6 {
        // SAFETY: the caller's; four aligned words inside the struct.
        unsafe {
            let w = core::ptr::addr_of!((*sa).user_ip6) as *const u32;
            [
                core::ptr::read_volatile(w),
                core::ptr::read_volatile(w.add(1)),
                core::ptr::read_volatile(w.add(2)),
                core::ptr::read_volatile(w.add(3)),
            ]
        }
    }
    #[inline(always)]
    unsafe fn set_user_addr(sa: *mut bpf_sock_addr, addr: Addr6) {
        // SAFETY: as in `user_addr`.
        unsafe {
            let w = core::ptr::addr_of_mut!((*sa).user_ip6) as *mut u32;
            core::ptr::write_volatile(w, addr[0]);
            core::ptr::write_volatile(w.add(1), addr[1]);
            core::ptr::write_volatile(w.add(2), addr[2]);
            core::ptr::write_volatile(w.add(3), addr[3]);
        }
    }
    /// The node's IPv6 InternalIP, from its `ST8S_NODES` entry.
    #[inline(always)]
    fn node_addr(b: &Backend) -> Option<Addr6> {
        // SAFETY: copied out at once.
        let a = unsafe { ST8S_NODES.get(b.node_addr_be) }?.addr6;
        (a[0] | a[1] | a[2] | a[3] != 0).then_some(a)
    }
    #[inline(always)]
    fn hash_word(addr: Addr6) -> u32 {
        addr[0] ^ addr[1] ^ addr[2] ^ addr[3]
    }
}

/// A connect or send to a node's address on a steered port goes to the backend `choose` picks,
/// placed by the socket's cookie: this node's pod (its address and containerPort), or a node that
/// runs one (its address and the hostPort; that node serves a connection from a peer itself).
/// A port without backends is left alone, so the kernel refuses it at once as it would anyway;
/// so is an IPv6 socket whose chosen backend has no IPv6 address.
#[inline(always)]
fn sock_steer<F: SockFamily>(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    // SAFETY: the kernel hands every program a valid bpf_sock_addr.
    let (proto, daddr, dport) = unsafe { ((*sa).protocol as u8, F::user_addr(sa), (*sa).user_port as u16) };
    if proto != PROTO_TCP && proto != PROTO_UDP {
        return None;
    }
    let cfg = config()?;
    if daddr != F::self_addr(cfg) && !F::is_node(daddr) {
        return None;
    }
    let mut port = port_info_of(proto, dport)?;
    if port.backend_count == 0 {
        return None;
    }
    let pod_addr = F::pod_addr(&port);
    if pod_addr.is_none() {
        port.has_local = 0;
    }
    let slot = port.slot as u32;
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    let h = socket_hash(cookie, F::hash_word(daddr), dport, proto, cfg.hash_seed);
    let (to_addr, to_port, local) = match choose(&port, h, cfg.flags & CONFIG_PREFER_LOCAL != 0) {
        Choice::Local => (pod_addr?, port.local_port_be, true),
        Choice::Remote { backend, .. } => (F::node_addr(&backend)?, dport, false),
        Choice::None => return None,
    };
    // An entry that is there already wins: while a restarted agent's programs run next to the
    // old ones, the second program sees the first one's choice (a node address too) and must
    // not record it as what the application asked for. Without a way back at all, the
    // application would see the backend: leave the call as it was.
    match F::sock_revnat().insert(
        F::sock_key(cookie, to_addr, to_port),
        F::sock_value(daddr, dport),
        BPF_NOEXIST,
    ) {
        Ok(()) => {}
        Err(e) if e == -EEXIST => {}
        Err(_) => {
            count(slot, |c| c.drop_error += 1);
            return None;
        }
    }
    // SAFETY: as above; the address and user_port are writable in these hooks.
    unsafe {
        F::set_user_addr(sa, to_addr);
        (*sa).user_port = to_port as u32;
    }
    let kind = if local {
        count(slot, |c| c.socket_local += 1);
        EVENT_SOCKET_LOCAL
    } else {
        count(slot, |c| c.socket_remote += 1);
        EVENT_SOCKET_REMOTE
    };
    if monitoring() {
        let (was_lo, was_hi) = F::words(daddr);
        let (to_lo, to_hi) = F::words(to_addr);
        report_sock(
            event_word(kind, slot, F::FAMILY, proto, dport, to_port),
            was_lo,
            was_hi,
            to_lo,
            to_hi,
        );
    }
    Some(())
}

/// The backend's address in a received datagram or a socket's peer, back to the node address the
/// application used.
#[inline(always)]
fn sock_unsteer<F: SockFamily>(ctx: &SockAddrContext) -> Option<()> {
    let sa = ctx.sock_addr;
    // SAFETY: plain helper call on this program's context.
    let cookie = unsafe { bpf_get_socket_cookie(ctx.as_ptr()) };
    // SAFETY: the kernel hands every program a valid bpf_sock_addr.
    let key = unsafe { F::sock_key(cookie, F::user_addr(sa), (*sa).user_port as u16) };
    // SAFETY: copied out at once.
    let v = unsafe { F::sock_revnat().get(&key) }.copied()?;
    let (frontend, frontend_port) = F::sock_frontend(&v);
    // SAFETY: as above; both fields are writable in these hooks.
    unsafe {
        F::set_user_addr(sa, frontend);
        (*sa).user_port = frontend_port as u32;
    }
    Some(())
}

const _: () = assert!(TC_ACT_REDIRECT == 7);
// `report_skb` masks the snapshot's length with it.
const _: () = assert!(EVENT_SNAP.is_power_of_two());

#[cfg(not(test))]
#[panic_handler]
fn panic(_info: &core::panic::PanicInfo) -> ! {
    loop {}
}

// The kernel accepts "Dual MIT/GPL" as GPL-compatible (include/linux/license.h), which the
// GPL-only helpers used here need; it matches the crate's "MIT OR GPL-2.0-only" (see LICENSE).
#[link_section = "license"]
#[no_mangle]
static LICENSE: [u8; 13] = *b"Dual MIT/GPL\0";
