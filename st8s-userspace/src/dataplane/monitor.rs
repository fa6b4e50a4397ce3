//! `st8s monitor`: the steering decisions of this node as they happen, one line each.
//!
//! The programs write an [`Event`] to the `ST8S_EVENTS` ring buffer at every decision, but only
//! while `ST8S_MONITOR` says that someone listens: this command pushes that deadline a few
//! seconds ahead while it runs and clears it when it stops, so the dataplane pays one array read
//! per decision when no one watches. An event carries the packet as st8s passed it on (its
//! first 128 bytes, after the translation) and what the translation replaced; the line is read
//! from both. Events the ring buffer had no room for are counted by the programs
//! (`monitor_lost`) and reported here.

use std::{
    collections::HashMap as StdHashMap,
    fmt::Write as _,
    fs::File,
    io::{BufWriter, Write as _},
    net::{IpAddr, Ipv4Addr, Ipv6Addr},
    path::{Path, PathBuf},
    time::Duration,
};

use anyhow::{Context as _, bail};
use aya::maps::{Array, HashMap, MapData, RingBuf};
use st8s_common::{
    EVENT_ANNOUNCED, EVENT_DISCOVERED, EVENT_DROP_ERROR, EVENT_DROP_NO_LOCAL_BACKEND, EVENT_FORWARDED,
    EVENT_FRAG_INVALID, EVENT_FRAG_UNTRACKED, EVENT_ICMP_ERROR, EVENT_LOCAL, EVENT_PASSED, EVENT_REPLIED,
    EVENT_SNAP, EVENT_SOCKET_LOCAL, EVENT_SOCKET_REMOTE, EVENT_UNTRUSTED_PEER, Event, MonitorCtl, NodeInfo,
    PROTO_TCP, PROTO_UDP, addr6_octets, map_names,
};
use tokio::{
    io::{Interest, unix::AsyncFd},
    signal::unix::{SignalKind, signal},
};

use super::{inspect, net::format_mac, open_pinned};

/// How far ahead `st8s monitor` keeps the programs reporting, and how often it renews.
const LEASE: Duration = Duration::from_secs(3);
const RENEW: Duration = Duration::from_secs(1);

/// The verdicts `--verdict` takes, each with the `st8s inspect` counters it covers.
pub const VERDICTS: [(&str, &[&str]); 9] = [
    ("local", &["delivered_local"]),
    ("forwarded", &["forwarded"]),
    ("reply", &["replied"]),
    (
        "passed",
        &["passed", "untrusted_peer", "frag_untracked", "frag_invalid"],
    ),
    ("dropped", &["drop_no_local_backend", "drop_error"]),
    ("discovery", &["discovered"]),
    ("announce", &["replied"]),
    ("socket", &["socket_local", "socket_remote"]),
    ("icmp", &["icmp_errors"]),
];

#[derive(clap::Args, Debug, Clone)]
pub struct MonitorArgs {
    /// The pin directory of the agent whose decisions to show.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/st8s")]
    pub pin_dir: PathBuf,
    /// Only packets to or from this steered port (the frontend's, the hostPort).
    #[arg(long)]
    pub port: Option<u16>,
    /// Only this client's packets (its address).
    #[arg(long)]
    pub client: Option<IpAddr>,
    /// Only these verdicts: local, forwarded, reply, passed, dropped, discovery, announce, socket,
    /// icmp (or a counter name of `st8s inspect`, such as untrusted_peer). Repeat or separate
    /// with commas.
    #[arg(long, value_delimiter = ',')]
    pub verdict: Vec<String>,
    /// Also write the packets shown to FILE in pcap format (Wireshark, `tcpdump -r`), as st8s
    /// passed them on: first 128 bytes, after the translation. Socket events carry no packet.
    #[arg(long, value_name = "FILE")]
    pub pcap: Option<PathBuf>,
    /// Stop after this many events shown.
    #[arg(long)]
    pub count: Option<u64>,
    /// Stop after this many seconds.
    #[arg(long, value_name = "SECONDS")]
    pub duration: Option<f64>,
    /// `text` for people, `json` for scripts: one object per line.
    #[arg(long, value_enum, default_value = "text")]
    pub output: LineFormat,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum LineFormat {
    Text,
    Json,
}

/// The headers of an event's packet, as far as its snapshot shows them.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Headers {
    pub dst_mac: [u8; 6],
    pub src: Option<IpAddr>,
    pub dst: Option<IpAddr>,
    pub proto: u8,
    pub sport: Option<u16>,
    pub dport: Option<u16>,
    /// A fragment: its offset in bytes (0 for the first).
    pub fragment: Option<u32>,
    /// An ICMP error: its type and code, and the packet it quotes.
    pub icmp: Option<(u8, u8, Option<Quoted>)>,
}

/// The packet an ICMP error quotes: source address and port, destination address and port,
/// protocol.
pub type Quoted = (IpAddr, u16, IpAddr, u16, u8);

/// Reads the Ethernet, IP and TCP/UDP/ICMP headers of a snapshot; what is cut off stays `None`.
pub fn parse_headers(p: &[u8]) -> Headers {
    let mut h = Headers::default();
    if p.len() < 14 {
        return h;
    }
    h.dst_mac.copy_from_slice(&p[..6]);
    let Some((src, dst, proto, l4, frag)) = parse_ip(&p[12..14], &p[14..]) else {
        return h;
    };
    (h.src, h.dst, h.proto, h.fragment) = (Some(src), Some(dst), proto, frag);
    if frag.is_some_and(|off| off != 0) {
        return h;
    }
    let l4 = &p[14 + l4..];
    match proto {
        PROTO_TCP | PROTO_UDP if l4.len() >= 4 => {
            h.sport = Some(u16::from_be_bytes([l4[0], l4[1]]));
            h.dport = Some(u16::from_be_bytes([l4[2], l4[3]]));
        }
        1 | 58 if l4.len() >= 8 => {
            // The quoted packet starts after the 8-byte ICMP header, without an Ethernet header.
            let quoted = parse_ip(if proto == 1 { &[0x08, 0x00] } else { &[0x86, 0xdd] }, &l4[8..]).and_then(
                |(s, d, quoted_proto, off, _)| {
                    let q = l4.get(8 + off..8 + off + 4)?;
                    Some((
                        s,
                        u16::from_be_bytes([q[0], q[1]]),
                        d,
                        u16::from_be_bytes([q[2], q[3]]),
                        quoted_proto,
                    ))
                },
            );
            h.icmp = Some((l4[0], l4[1], quoted));
        }
        _ => {}
    }
    h
}

/// An IP header after the EtherType `ethertype`: source, destination, the upper protocol, where
/// its header starts, and the fragment offset of a fragment.
fn parse_ip(ethertype: &[u8], ip: &[u8]) -> Option<(IpAddr, IpAddr, u8, usize, Option<u32>)> {
    match ethertype {
        [0x08, 0x00] if ip.len() >= 20 => {
            let ihl = usize::from(ip[0] & 0x0f) * 4;
            let frag = u16::from_be_bytes([ip[6], ip[7]]);
            let is_frag = frag & 0x3fff != 0;
            let src = Ipv4Addr::new(ip[12], ip[13], ip[14], ip[15]);
            let dst = Ipv4Addr::new(ip[16], ip[17], ip[18], ip[19]);
            let off = u32::from(frag & 0x1fff) * 8;
            Some((src.into(), dst.into(), ip[9], ihl, is_frag.then_some(off)))
        }
        [0x86, 0xdd] if ip.len() >= 40 => {
            let src = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[8..24]).ok()?);
            let dst = Ipv6Addr::from(<[u8; 16]>::try_from(&ip[24..40]).ok()?);
            let (mut next, mut at, mut frag) = (ip[6], 40usize, None);
            // Extension headers, as the programs walk them (hop-by-hop, routing, destination
            // options, fragment).
            for _ in 0..4 {
                match next {
                    0 | 43 | 60 => {
                        let h = ip.get(at..at + 2)?;
                        next = h[0];
                        at += (usize::from(h[1]) + 1) * 8;
                    }
                    44 => {
                        let h = ip.get(at..at + 8)?;
                        next = h[0];
                        frag = Some(u32::from(u16::from_be_bytes([h[2], h[3]]) & 0xfff8));
                        at += 8;
                    }
                    _ => break,
                }
            }
            Some((src.into(), dst.into(), next, at, frag))
        }
        _ => None,
    }
}

/// One decision, ready to print.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Line {
    pub ts_ns: u64,
    /// One of [`VERDICTS`].
    pub verdict: &'static str,
    /// The `st8s inspect` counter the decision was counted in (its reason, for passed and
    /// dropped packets).
    pub counter: &'static str,
    pub proto: &'static str,
    pub client: Option<String>,
    pub frontend: Option<String>,
    pub backend: Option<String>,
    /// The steered port (`80/tcp`).
    pub port: Option<String>,
    pub fragment: Option<u32>,
    pub icmp: Option<(u8, u8)>,
    pub bytes: u32,
    pub ifindex: u32,
    /// For filtering: the client's address and the frontend's port.
    client_addr: Option<IpAddr>,
    frontend_port: Option<u16>,
    /// An ICMP error's flow's protocol.
    flow_proto: Option<&'static str>,
}

fn proto_name(p: u8) -> &'static str {
    match p {
        PROTO_TCP => "tcp",
        PROTO_UDP => "udp",
        1 => "icmp",
        58 => "icmpv6",
        _ => "ip",
    }
}

fn sock(addr: Option<IpAddr>, port: Option<u16>) -> Option<String> {
    let addr = addr?;
    Some(match (addr, port) {
        (IpAddr::V6(a), Some(p)) => format!("[{a}]:{p}"),
        (a, Some(p)) => format!("{a}:{p}"),
        (a, None) => a.to_string(),
    })
}

/// An address of the family `family` as the events carry them (IPv4 in the first word).
fn event_addr(family: u8, a: [u32; 4]) -> Option<IpAddr> {
    match family {
        _ if a == [0; 4] => None,
        6 => Some(Ipv6Addr::from(addr6_octets(a)).into()),
        _ => Some(Ipv4Addr::from(u32::from_be(a[0])).into()),
    }
}

/// Turns an event into its line. `node_of` names the node a forwarded packet went to, by the
/// destination MAC the packet now carries.
pub fn line(e: &Event, node_of: &mut dyn FnMut([u8; 6]) -> Option<IpAddr>) -> Line {
    let snap = &e.data[..usize::from(e.snap_len).min(EVENT_SNAP)];
    let h = parse_headers(snap);
    let was = sock(event_addr(e.family, e.was), Some(u16::from_be(e.was_port_be)));
    let src = sock(h.src, h.sport);
    let dst = sock(h.dst, h.dport);
    let (verdict, counter) = match e.kind {
        EVENT_LOCAL => ("local", "delivered_local"),
        EVENT_FORWARDED => ("forwarded", "forwarded"),
        EVENT_REPLIED => ("reply", "replied"),
        EVENT_PASSED => ("passed", "passed"),
        EVENT_UNTRUSTED_PEER => ("passed", "untrusted_peer"),
        EVENT_FRAG_UNTRACKED => ("passed", "frag_untracked"),
        EVENT_FRAG_INVALID => ("passed", "frag_invalid"),
        EVENT_DROP_NO_LOCAL_BACKEND => ("dropped", "drop_no_local_backend"),
        EVENT_DROP_ERROR => ("dropped", "drop_error"),
        EVENT_DISCOVERED => ("discovery", "discovered"),
        EVENT_ANNOUNCED => ("announce", "replied"),
        EVENT_SOCKET_LOCAL => ("socket", "socket_local"),
        EVENT_SOCKET_REMOTE => ("socket", "socket_remote"),
        EVENT_ICMP_ERROR => ("icmp", "icmp_errors"),
        _ => ("unknown", "unknown"),
    };
    let mut l = Line {
        ts_ns: e.ts_ns,
        verdict,
        counter,
        proto: proto_name(if e.kind == EVENT_SOCKET_LOCAL || e.kind == EVENT_SOCKET_REMOTE {
            e.proto
        } else {
            h.proto
        }),
        client: None,
        frontend: None,
        backend: None,
        port: None,
        fragment: h.fragment,
        icmp: h.icmp.map(|(t, c, _)| (t, c)),
        bytes: e.pkt_len,
        ifindex: e.ifindex,
        client_addr: None,
        frontend_port: None,
        flow_proto: None,
    };
    // Which side of the packet is the client, which the frontend, and where the backend shows.
    match e.kind {
        EVENT_LOCAL => {
            (l.client, l.client_addr) = (src, h.src);
            l.frontend = was;
            l.frontend_port = Some(u16::from_be(e.was_port_be));
            l.backend = dst;
        }
        EVENT_REPLIED => {
            (l.client, l.client_addr) = (dst, h.dst);
            (l.frontend, l.frontend_port) = (src, h.sport);
            l.backend = was;
        }
        EVENT_DISCOVERED => {
            (l.client, l.client_addr) = (src, h.src);
            (l.frontend, l.frontend_port) = (dst, h.dport);
            l.backend = was;
        }
        EVENT_ANNOUNCED => {
            (l.client, l.client_addr) = (dst, h.dst);
            (l.frontend, l.frontend_port) = (src, h.sport);
            l.backend = was;
        }
        EVENT_SOCKET_LOCAL | EVENT_SOCKET_REMOTE => {
            l.client = Some("this node".into());
            l.frontend = was;
            l.frontend_port = Some(u16::from_be(e.was_port_be));
            l.backend = sock(event_addr(e.family, e.to), Some(u16::from_be(e.to_port_be)));
        }
        EVENT_ICMP_ERROR => {
            // The quoted packet names the flow: from the client to the frontend, or (a pod's
            // error, translated) from the frontend to the client.
            if let Some((_, _, Some((qs, qsp, qd, qdp, qp)))) = h.icmp {
                // The port is the flow's: `53/udp`, not the ICMP message's protocol.
                l.flow_proto = Some(proto_name(qp));
                let to_client = h.dst == Some(qs);
                let (c, cp, f, fp) = if to_client {
                    (qs, qsp, qd, qdp)
                } else {
                    (qd, qdp, qs, qsp)
                };
                (l.client, l.client_addr) = (sock(Some(c), Some(cp)), Some(c));
                (l.frontend, l.frontend_port) = (sock(Some(f), Some(fp)), Some(fp));
            }
            l.backend = was;
        }
        _ => {
            (l.client, l.client_addr) = (src, h.src);
            (l.frontend, l.frontend_port) = (dst, h.dport);
            if e.kind == EVENT_FORWARDED {
                l.backend = Some(match node_of(h.dst_mac) {
                    Some(node) => format!("node {node}"),
                    None => format!("node at {}", format_mac(&h.dst_mac)),
                });
            }
        }
    }
    if let Some(p) = l.frontend_port {
        l.port = Some(format!("{p}/{}", l.flow_proto.unwrap_or(l.proto)));
    }
    l
}

/// What `--port`, `--client` and `--verdict` let through.
#[derive(Clone, Debug, Default)]
pub struct Filter {
    pub port: Option<u16>,
    pub client: Option<IpAddr>,
    pub verdicts: Vec<String>,
}

impl Filter {
    /// Checks the verdict names: each one a verdict or an `st8s inspect` counter.
    pub fn new(port: Option<u16>, client: Option<IpAddr>, verdicts: Vec<String>) -> anyhow::Result<Self> {
        for v in &verdicts {
            let known = VERDICTS
                .iter()
                .any(|(name, counters)| name == v || counters.contains(&v.as_str()));
            if !known {
                let names: Vec<&str> = VERDICTS.iter().map(|(n, _)| *n).collect();
                bail!(
                    "unknown verdict {v:?}: one of {} or a counter name",
                    names.join(", ")
                );
            }
        }
        Ok(Filter {
            port,
            client,
            verdicts,
        })
    }

    pub fn admits(&self, l: &Line) -> bool {
        self.port.is_none_or(|p| l.frontend_port == Some(p))
            && self.client.is_none_or(|c| l.client_addr == Some(c))
            && (self.verdicts.is_empty() || self.verdicts.iter().any(|v| v == l.verdict || v == l.counter))
    }
}

/// Nanoseconds since the epoch of a CLOCK_MONOTONIC time, by the offset between the clocks now.
fn clock_ns(clock: libc::clockid_t) -> u64 {
    let mut ts = libc::timespec {
        tv_sec: 0,
        tv_nsec: 0,
    };
    // SAFETY: a valid clock id and a timespec to write.
    unsafe { libc::clock_gettime(clock, &mut ts) };
    ts.tv_sec as u64 * 1_000_000_000 + ts.tv_nsec as u64
}

/// A UTC time of day from nanoseconds since the epoch: `HH:MM:SS.uuuuuu`.
pub fn time_of_day(epoch_ns: u64) -> String {
    let secs = epoch_ns / 1_000_000_000;
    let day = secs % 86_400;
    format!(
        "{:02}:{:02}:{:02}.{:06}",
        day / 3600,
        day / 60 % 60,
        day % 60,
        epoch_ns % 1_000_000_000 / 1000
    )
}

/// An RFC 3339 UTC timestamp from nanoseconds since the epoch (the civil date from the day
/// count, proleptic Gregorian calendar).
pub fn rfc3339(epoch_ns: u64) -> String {
    let days = (epoch_ns / 1_000_000_000 / 86_400) as i64;
    // Days since 0000-03-01, in 400-year eras of 146,097 days.
    let z = days + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = doy - (153 * mp + 2) / 5 + 1;
    let m = if mp < 10 { mp + 3 } else { mp - 9 };
    let y = yoe + era * 400 + i64::from(m <= 2);
    format!("{y:04}-{m:02}-{d:02}T{}Z", time_of_day(epoch_ns))
}

/// The line for people.
pub fn render_text(l: &Line, epoch_ns: u64) -> String {
    let mut s = format!("{} {:<9}", time_of_day(epoch_ns), l.verdict);
    let arrow = match l.verdict {
        "reply" | "announce" => "<-",
        _ => "->",
    };
    let _ = write!(
        s,
        " {} {arrow} {}",
        l.client.as_deref().unwrap_or("?"),
        l.frontend.as_deref().unwrap_or("?"),
    );
    let _ = write!(s, " {}", l.proto);
    if let Some(b) = &l.backend {
        let _ = write!(s, " {arrow} {b}");
    }
    // The reason, where the verdict alone does not say it (socket: local or remote).
    if !matches!(
        l.verdict,
        "local" | "forwarded" | "reply" | "discovery" | "announce" | "icmp"
    ) {
        let _ = write!(s, " ({})", l.counter);
    }
    if let Some((t, c)) = l.icmp {
        let _ = write!(s, " type {t} code {c}");
    }
    if let Some(off) = l.fragment {
        let _ = write!(s, " fragment offset {off}");
    }
    let _ = write!(s, " {}B", l.bytes);
    s
}

/// The line for scripts: the field names of `st8s inspect --output json` where they overlap.
pub fn render_json(l: &Line, epoch_ns: u64) -> serde_json::Value {
    serde_json::json!({
        "time": rfc3339(epoch_ns),
        "verdict": l.verdict,
        "counter": l.counter,
        "proto": l.proto,
        "client": l.client,
        "frontend": l.frontend,
        "backend": l.backend,
        "port": l.port,
        "fragment_offset": l.fragment,
        "icmp_type": l.icmp.map(|(t, _)| t),
        "icmp_code": l.icmp.map(|(_, c)| c),
        "bytes": l.bytes,
        "ifindex": l.ifindex,
    })
}

/// A pcap file (the classic format, nanosecond timestamps, Ethernet frames), written as events
/// come so that a stopped monitor leaves a readable file.
pub struct Pcap {
    out: BufWriter<File>,
}

/// The classic pcap magic for nanosecond timestamps, and LINKTYPE_ETHERNET.
const PCAP_MAGIC_NS: u32 = 0xa1b2_3c4d;
const LINKTYPE_ETHERNET: u32 = 1;

impl Pcap {
    pub fn create(path: &Path) -> anyhow::Result<Self> {
        let file = File::create(path).with_context(|| format!("creating {}", path.display()))?;
        let mut out = BufWriter::new(file);
        out.write_all(&pcap_header())?;
        out.flush()?;
        Ok(Pcap { out })
    }

    pub fn write(&mut self, epoch_ns: u64, frame: &[u8], wire_len: u32) -> anyhow::Result<()> {
        self.out
            .write_all(&pcap_record_header(epoch_ns, frame.len() as u32, wire_len))?;
        self.out.write_all(frame)?;
        Ok(())
    }

    pub fn flush(&mut self) -> anyhow::Result<()> {
        Ok(self.out.flush()?)
    }
}

fn pcap_header() -> Vec<u8> {
    let mut h = Vec::with_capacity(24);
    h.extend_from_slice(&PCAP_MAGIC_NS.to_le_bytes());
    h.extend_from_slice(&2u16.to_le_bytes());
    h.extend_from_slice(&4u16.to_le_bytes());
    h.extend_from_slice(&0i32.to_le_bytes());
    h.extend_from_slice(&0u32.to_le_bytes());
    h.extend_from_slice(&(EVENT_SNAP as u32).to_le_bytes());
    h.extend_from_slice(&LINKTYPE_ETHERNET.to_le_bytes());
    h
}

fn pcap_record_header(epoch_ns: u64, captured: u32, wire_len: u32) -> Vec<u8> {
    let mut h = Vec::with_capacity(16);
    h.extend_from_slice(&((epoch_ns / 1_000_000_000) as u32).to_le_bytes());
    h.extend_from_slice(&((epoch_ns % 1_000_000_000) as u32).to_le_bytes());
    h.extend_from_slice(&captured.to_le_bytes());
    h.extend_from_slice(&wire_len.max(captured).to_le_bytes());
    h
}

/// Decodes one ring buffer record.
pub fn decode(bytes: &[u8]) -> Option<Event> {
    if bytes.len() < std::mem::size_of::<Event>() {
        return None;
    }
    // SAFETY: long enough, and `Event` is plain integers, valid for any bytes.
    Some(unsafe { std::ptr::read_unaligned(bytes.as_ptr() as *const Event) })
}

/// Tells the programs that someone listens, until a deadline renewed while this runs; clears it
/// when dropped.
struct Lease {
    map: Array<MapData, MonitorCtl>,
}

impl Lease {
    fn take(dir: &Path) -> anyhow::Result<Self> {
        let map = open_pinned(dir, map_names::MONITOR).map_err(|e| {
            e.context("this agent's programs have no monitor (ST8S_MONITOR): upgrade the agent")
        })?;
        let map: Array<MapData, MonitorCtl> = Array::try_from(map)?;
        let now = clock_ns(libc::CLOCK_MONOTONIC);
        let held = map.get(&0, 0).context("reading ST8S_MONITOR")?;
        if held.until_ns > now {
            bail!(
                "another st8s monitor listens on this node (or one stopped less than {} s ago): \
                 the ring buffer has one reader; stop it and try again",
                LEASE.as_secs()
            );
        }
        let mut lease = Lease { map };
        lease.renew()?;
        Ok(lease)
    }

    fn renew(&mut self) -> anyhow::Result<()> {
        let until_ns = clock_ns(libc::CLOCK_MONOTONIC) + LEASE.as_nanos() as u64;
        self.map
            .set(0, MonitorCtl { until_ns }, 0)
            .context("writing ST8S_MONITOR")
    }
}

impl Drop for Lease {
    fn drop(&mut self) {
        let _ = self.map.set(0, MonitorCtl::default(), 0);
    }
}

/// The node behind each MAC, from `ST8S_NODES`; read again when a MAC is new.
struct Peers {
    dir: PathBuf,
    known: StdHashMap<[u8; 6], IpAddr>,
}

impl Peers {
    fn lookup(&mut self, mac: [u8; 6]) -> Option<IpAddr> {
        if !self.known.contains_key(&mac)
            && let Ok(map) = open_pinned(&self.dir, map_names::NODES)
            && let Ok(nodes) = HashMap::<_, u32, NodeInfo>::try_from(map)
        {
            self.known = nodes
                .iter()
                .flatten()
                .map(|(addr, n)| (n.mac, Ipv4Addr::from(u32::from_be(addr)).into()))
                .collect();
        }
        self.known.get(&mac).copied()
    }
}

fn lost_so_far(dir: &Path) -> u64 {
    inspect::global_counters(dir).map(|c| c.monitor_lost).unwrap_or(0)
}

/// What `st8s monitor` does with the events it reads: filters them, prints them, writes them to
/// the pcap, and counts what it showed.
struct Shower {
    filter: Filter,
    output: LineFormat,
    pcap: Option<Pcap>,
    peers: Peers,
    /// CLOCK_REALTIME minus CLOCK_MONOTONIC: the events' times as wall-clock times.
    offset: u64,
    count: Option<u64>,
    shown: u64,
    /// `--count` reached or standard output closed: nothing more is shown.
    done: bool,
}

impl Shower {
    /// Shows every event the ring buffer holds; true when the monitor should stop (`--count`
    /// reached, or standard output closed, as when piped into `head`).
    fn drain(&mut self, ring: &mut RingBuf<MapData>) -> anyhow::Result<bool> {
        if self.done {
            return Ok(true);
        }
        let stdout = std::io::stdout();
        let mut out = stdout.lock();
        let mut stop = false;
        while let Some(item) = ring.next() {
            let Some(e) = decode(&item) else { continue };
            drop(item);
            let l = line(&e, &mut |mac| self.peers.lookup(mac));
            if !self.filter.admits(&l) {
                continue;
            }
            let at = e.ts_ns + self.offset;
            let written = match self.output {
                LineFormat::Text => writeln!(out, "{}", render_text(&l, at)),
                LineFormat::Json => writeln!(out, "{}", render_json(&l, at)),
            };
            if let Err(e) = written {
                if e.kind() == std::io::ErrorKind::BrokenPipe {
                    stop = true;
                    break;
                }
                return Err(e.into());
            }
            if let Some(p) = self.pcap.as_mut()
                && e.snap_len > 0
            {
                let n = usize::from(e.snap_len).min(EVENT_SNAP);
                p.write(at, &e.data[..n], e.pkt_len)?;
            }
            self.shown += 1;
            if self.count.is_some_and(|c| self.shown >= c) {
                stop = true;
                break;
            }
        }
        match out.flush() {
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => stop = true,
            other => other?,
        }
        if let Some(p) = self.pcap.as_mut() {
            p.flush()?;
        }
        self.done = stop;
        Ok(stop)
    }
}

/// `st8s monitor`.
pub async fn run(args: MonitorArgs) -> anyhow::Result<()> {
    let filter = Filter::new(args.port, args.client, args.verdict.clone())?;
    let events = open_pinned(&args.pin_dir, map_names::EVENTS)
        .map_err(|e| e.context("this agent's programs have no monitor (ST8S_EVENTS): upgrade the agent"))?;
    let ring = RingBuf::try_from(events)?;
    let pcap = args.pcap.as_deref().map(Pcap::create).transpose()?;
    let lost_at_start = lost_so_far(&args.pin_dir);
    let mut lease = Lease::take(&args.pin_dir)?;
    // SAFETY: the ring buffer owns its map's descriptor, open and the same until it is dropped,
    // which happens only with the AsyncFd.
    let mut ring = unsafe { AsyncFd::register_with_interest(ring, Interest::READABLE) }
        .map_err(std::io::Error::from)
        .context("watching ST8S_EVENTS")?;
    let mut shower = Shower {
        filter,
        output: args.output,
        pcap,
        peers: Peers {
            dir: args.pin_dir.clone(),
            known: StdHashMap::new(),
        },
        offset: clock_ns(libc::CLOCK_REALTIME).saturating_sub(clock_ns(libc::CLOCK_MONOTONIC)),
        count: args.count,
        shown: 0,
        done: false,
    };
    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let deadline = args
        .duration
        .map(|s| tokio::time::Instant::now() + Duration::from_secs_f64(s.max(0.0)));
    let mut renew = tokio::time::interval(RENEW);
    let mut lost_reported = 0u64;
    eprintln!(
        "st8s monitor: listening on {} (Ctrl-C to stop)",
        args.pin_dir.join(map_names::EVENTS).display()
    );
    loop {
        tokio::select! {
            _ = term.recv() => break,
            _ = int.recv() => break,
            _ = async { tokio::time::sleep_until(deadline.unwrap_or_else(tokio::time::Instant::now)).await }, if deadline.is_some() => break,
            _ = renew.tick() => {
                lease.renew()?;
                let lost = lost_so_far(&args.pin_dir).saturating_sub(lost_at_start);
                if lost > lost_reported {
                    eprintln!("st8s monitor: {lost} events lost so far (the ring buffer was full)");
                    lost_reported = lost;
                }
            }
            guard = ring.readable_mut() => {
                let mut guard = guard.context("waiting for ST8S_EVENTS")?;
                if shower.drain(guard.get_inner_mut())? {
                    break;
                }
                guard.clear_ready();
                // The kernel wakes a reader only when it had caught up: an event submitted
                // between the drain and `clear_ready` woke us already, and the next one will
                // not. Read once more, so none waits for a wake-up that does not come.
                if shower.drain(guard.get_inner_mut())? {
                    break;
                }
            }
        }
    }
    drop(lease);
    // What came in before the lease was dropped.
    shower.drain(ring.get_mut())?;
    let lost = lost_so_far(&args.pin_dir).saturating_sub(lost_at_start);
    eprintln!("st8s monitor: {} events shown, {lost} lost", shower.shown);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::packet::Frame;

    fn event(kind: u8, frame: &[u8]) -> Event {
        let mut data = [0u8; EVENT_SNAP];
        let n = frame.len().min(EVENT_SNAP);
        data[..n].copy_from_slice(&frame[..n]);
        Event {
            ts_ns: 1,
            kind,
            family: 4,
            proto: 0,
            _pad: 0,
            slot: 0,
            snap_len: n as u16,
            pkt_len: frame.len() as u32,
            ifindex: 3,
            was: [0; 4],
            was_port_be: 0,
            to_port_be: 0,
            to: [0; 4],
            data,
        }
    }

    fn v4(a: &str) -> [u32; 4] {
        [u32::from(a.parse::<Ipv4Addr>().unwrap()).to_be(), 0, 0, 0]
    }

    #[test]
    fn a_local_delivery_shows_the_client_the_frontend_it_used_and_the_pod() {
        // As the pod gets it: to the pod's address and containerPort.
        let f = Frame::udp(
            "10.0.0.100".parse().unwrap(),
            40000,
            "10.244.1.5".parse().unwrap(),
            5353,
        )
        .build();
        let mut e = event(EVENT_LOCAL, &f);
        (e.was, e.was_port_be) = (v4("10.0.0.11"), 53u16.to_be());
        let l = line(&e, &mut |_| None);
        assert_eq!(l.verdict, "local");
        assert_eq!(l.counter, "delivered_local");
        assert_eq!(l.client.as_deref(), Some("10.0.0.100:40000"));
        assert_eq!(l.frontend.as_deref(), Some("10.0.0.11:53"));
        assert_eq!(l.backend.as_deref(), Some("10.244.1.5:5353"));
        assert_eq!(l.port.as_deref(), Some("53/udp"));
        let f = Filter::new(
            Some(53),
            Some("10.0.0.100".parse().unwrap()),
            vec!["local".into()],
        )
        .unwrap();
        assert!(f.admits(&l));
        assert!(!Filter::new(Some(80), None, vec![]).unwrap().admits(&l));
        assert!(
            !Filter::new(None, Some("10.0.0.9".parse().unwrap()), vec![])
                .unwrap()
                .admits(&l)
        );
        assert!(
            !Filter::new(None, None, vec!["dropped".into()])
                .unwrap()
                .admits(&l)
        );
        assert!(
            Filter::new(None, None, vec!["delivered_local".into()])
                .unwrap()
                .admits(&l)
        );
    }

    #[test]
    fn a_reply_shows_the_client_on_the_far_side_and_the_pod_it_came_from() {
        let f = Frame::tcp(
            "10.0.0.11".parse().unwrap(),
            80,
            "10.0.0.100".parse().unwrap(),
            40000,
        )
        .build();
        let mut e = event(EVENT_REPLIED, &f);
        (e.was, e.was_port_be) = (v4("10.244.1.5"), 8080u16.to_be());
        let l = line(&e, &mut |_| None);
        assert_eq!(
            (l.client.as_deref(), l.frontend.as_deref(), l.backend.as_deref()),
            (
                Some("10.0.0.100:40000"),
                Some("10.0.0.11:80"),
                Some("10.244.1.5:8080")
            )
        );
        let text = render_text(&l, 0);
        assert!(
            text.contains("reply")
                && text.contains("10.0.0.100:40000 <- 10.0.0.11:80 tcp <- 10.244.1.5:8080"),
            "{text}"
        );
    }

    #[test]
    fn a_forwarded_packet_names_the_node_by_its_mac() {
        let mut fr = Frame::tcp(
            "10.0.0.100".parse().unwrap(),
            40000,
            "10.0.0.11".parse().unwrap(),
            80,
        );
        fr.dst_mac = [2, 0, 0, 0, 0, 12];
        let e = event(EVENT_FORWARDED, &fr.build());
        let l = line(&e, &mut |mac| {
            (mac == [2, 0, 0, 0, 0, 12]).then(|| "10.0.0.12".parse().unwrap())
        });
        assert_eq!(l.backend.as_deref(), Some("node 10.0.0.12"));
        let l = line(&e, &mut |_| None);
        assert_eq!(l.backend.as_deref(), Some("node at 02:00:00:00:00:0c"));
    }

    #[test]
    fn a_socket_steer_has_no_packet_but_both_ends() {
        let mut e = event(EVENT_SOCKET_REMOTE, &[]);
        e.family = 6;
        e.proto = PROTO_TCP;
        e.was = st8s_common::addr6("fd00:77::11".parse::<Ipv6Addr>().unwrap().octets());
        e.to = st8s_common::addr6("fd00:77::12".parse::<Ipv6Addr>().unwrap().octets());
        (e.was_port_be, e.to_port_be) = (80u16.to_be(), 80u16.to_be());
        let l = line(&e, &mut |_| None);
        assert_eq!(
            (l.verdict, l.counter, l.proto),
            ("socket", "socket_remote", "tcp")
        );
        assert_eq!(l.frontend.as_deref(), Some("[fd00:77::11]:80"));
        assert_eq!(l.backend.as_deref(), Some("[fd00:77::12]:80"));
        assert_eq!(l.port.as_deref(), Some("80/tcp"));
    }

    #[test]
    fn an_icmp_error_names_the_flow_it_quotes() {
        // A pod's port unreachable, translated: from the node to the client, quoting the
        // client's datagram to the node's port 5300.
        let quoted = Frame::udp(
            "10.0.0.100".parse().unwrap(),
            40000,
            "10.0.0.11".parse().unwrap(),
            5300,
        )
        .build();
        let mut f = vec![0u8; 12];
        f.extend_from_slice(&[0x08, 0x00]);
        let total = (20 + 8 + quoted.len() - 14) as u16;
        f.extend_from_slice(&[0x45, 0, (total >> 8) as u8, total as u8, 0, 0, 0, 0, 64, 1, 0, 0]);
        f.extend_from_slice(&[10, 0, 0, 11, 10, 0, 0, 100]);
        f.extend_from_slice(&[3, 3, 0, 0, 0, 0, 0, 0]);
        f.extend_from_slice(&quoted[14..]);
        let mut e = event(EVENT_ICMP_ERROR, &f);
        (e.was, e.was_port_be) = (v4("10.244.1.5"), 5300u16.to_be());
        let l = line(&e, &mut |_| None);
        assert_eq!((l.verdict, l.proto, l.icmp), ("icmp", "icmp", Some((3, 3))));
        assert_eq!(l.client.as_deref(), Some("10.0.0.100:40000"));
        assert_eq!(l.frontend.as_deref(), Some("10.0.0.11:5300"));
        assert_eq!(l.port.as_deref(), Some("5300/udp"));
        assert_eq!(l.backend.as_deref(), Some("10.244.1.5:5300"));
    }

    #[test]
    fn unknown_verdicts_are_refused_with_the_known_ones() {
        let err = Filter::new(None, None, vec!["lokal".into()])
            .unwrap_err()
            .to_string();
        assert!(err.contains("local, forwarded, reply"), "{err}");
    }

    #[test]
    fn a_short_or_cut_snapshot_gives_what_it_can() {
        assert_eq!(parse_headers(&[0; 10]), Headers::default());
        let f = Frame::tcp("10.0.0.100".parse().unwrap(), 1, "10.0.0.11".parse().unwrap(), 2).build();
        let h = parse_headers(&f[..34]);
        assert_eq!(h.src, Some("10.0.0.100".parse().unwrap()));
        assert_eq!((h.sport, h.dport), (None, None));
    }

    #[test]
    fn times_are_utc() {
        // 2026-11-26T11:49:38.5Z
        let ns = 1_795_693_778_500_000_000; // `date -u -d 2026-11-26T11:49:38Z +%s`
        assert_eq!(rfc3339(ns), "2026-11-26T11:49:38.500000Z");
        assert_eq!(rfc3339(0), "1970-01-01T00:00:00.000000Z");
        assert_eq!(rfc3339(951_782_400_000_000_000), "2000-02-29T00:00:00.000000Z");
    }

    #[test]
    fn the_pcap_headers_are_the_classic_format() {
        let h = pcap_header();
        assert_eq!(h.len(), 24);
        assert_eq!(&h[..4], &[0x4d, 0x3c, 0xb2, 0xa1]);
        assert_eq!(u32::from_le_bytes(h[20..24].try_into().unwrap()), 1);
        let r = pcap_record_header(3_000_000_007, 60, 1500);
        assert_eq!(u32::from_le_bytes(r[..4].try_into().unwrap()), 3);
        assert_eq!(u32::from_le_bytes(r[4..8].try_into().unwrap()), 7);
        assert_eq!(u32::from_le_bytes(r[8..12].try_into().unwrap()), 60);
        assert_eq!(u32::from_le_bytes(r[12..16].try_into().unwrap()), 1500);
    }
}
