//! What the agent needs to know about the node's own network: interfaces, MAC addresses, routes
//! and neighbours. Everything here reads the network namespace the process runs in (ioctl,
//! getifaddrs, /proc/self/net, rtnetlink), never /sys, which shows the namespace that mounted it.

use std::{
    collections::BTreeMap,
    ffi::{CStr, CString},
    fs, io,
    net::{Ipv4Addr, UdpSocket},
};

use crate::dns::mdns::Subnet;

#[derive(Debug, thiserror::Error)]
pub enum NetError {
    #[error("no interface holds address {addr}")]
    NoInterfaceFor { addr: Ipv4Addr },
    #[error("interface {iface:?} does not exist")]
    NoSuchInterface { iface: String },
    #[error("cannot read the MAC address of {iface:?}")]
    Mac {
        iface: String,
        #[source]
        source: io::Error,
    },
    #[error("cannot list interface addresses")]
    Ifaddrs(#[source] io::Error),
    #[error("cannot read the bridge forwarding database")]
    Netlink(#[source] io::Error),
    #[error("cannot read {path}")]
    Proc {
        path: &'static str,
        #[source]
        source: io::Error,
    },
}

/// The interface that holds `addr`.
pub fn iface_with_addr(addr: Ipv4Addr) -> Result<String, NetError> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(NetError::Ifaddrs(io::Error::last_os_error()));
    }
    let mut found = None;
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        if !ifa.ifa_addr.is_null() {
            // SAFETY: ifa_addr is non-null; the family says which sockaddr it is.
            let family = unsafe { (*ifa.ifa_addr).sa_family } as i32;
            if family == libc::AF_INET {
                // SAFETY: AF_INET means sockaddr_in.
                let sin = unsafe { &*(ifa.ifa_addr as *const libc::sockaddr_in) };
                if Ipv4Addr::from(u32::from_be(sin.sin_addr.s_addr)) == addr {
                    // SAFETY: ifa_name is a C string owned by the list.
                    found = Some(
                        unsafe { CStr::from_ptr(ifa.ifa_name) }
                            .to_string_lossy()
                            .into_owned(),
                    );
                    break;
                }
            }
        }
        cur = ifa.ifa_next;
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    found.ok_or(NetError::NoInterfaceFor { addr })
}

/// The IPv4 addresses of `iface` with the broadcast address of each one's subnet (none for /31
/// and /32, which have no broadcast).
pub fn broadcasts(iface: &str) -> Result<BTreeMap<Ipv4Addr, Ipv4Addr>, NetError> {
    Ok(subnets(iface)?
        .into_iter()
        .filter(|s| u32::from(s.mask).count_ones() < 31)
        .map(|s| (s.addr, Ipv4Addr::from(u32::from(s.addr) | !u32::from(s.mask))))
        .collect())
}

/// The IPv4 addresses of `iface`, each with its netmask.
pub fn subnets(iface: &str) -> Result<Vec<Subnet>, NetError> {
    let mut ifap: *mut libc::ifaddrs = std::ptr::null_mut();
    // SAFETY: getifaddrs fills ifap with a list we free below.
    if unsafe { libc::getifaddrs(&mut ifap) } != 0 {
        return Err(NetError::Ifaddrs(io::Error::last_os_error()));
    }
    let mut out = Vec::new();
    let mut cur = ifap;
    while !cur.is_null() {
        // SAFETY: cur is a node of the list getifaddrs returned.
        let ifa = unsafe { &*cur };
        cur = ifa.ifa_next;
        if ifa.ifa_addr.is_null() || ifa.ifa_netmask.is_null() {
            continue;
        }
        // SAFETY: ifa_name is a C string owned by the list.
        if unsafe { CStr::from_ptr(ifa.ifa_name) }.to_bytes() != iface.as_bytes() {
            continue;
        }
        // SAFETY: ifa_addr is non-null; the family says which sockaddr it is.
        if i32::from(unsafe { (*ifa.ifa_addr).sa_family }) != libc::AF_INET {
            continue;
        }
        // SAFETY: AF_INET means sockaddr_in, for the address and its netmask alike.
        let (addr, mask) = unsafe {
            (
                u32::from_be((*(ifa.ifa_addr as *const libc::sockaddr_in)).sin_addr.s_addr),
                u32::from_be((*(ifa.ifa_netmask as *const libc::sockaddr_in)).sin_addr.s_addr),
            )
        };
        out.push(Subnet {
            addr: Ipv4Addr::from(addr),
            mask: Ipv4Addr::from(mask),
        });
    }
    // SAFETY: ifap came from getifaddrs.
    unsafe { libc::freeifaddrs(ifap) };
    Ok(out)
}

/// The IPv6 link-local address (fe80::/10) of `iface`, from `/proc/net/if_inet6`; `None` when
/// it has none (IPv6 off, or `addr_gen_mode` none).
pub fn link_local6(iface: &str) -> Option<std::net::Ipv6Addr> {
    let text = std::fs::read_to_string("/proc/net/if_inet6").ok()?;
    parse_link_local6(&text, iface)
}

/// One line per address: the address in 32 hex digits, ifindex, prefix length, scope, flags and
/// the interface's name (net/ipv6/addrconf.c, if6_seq_show). Scope 0x20 is link.
fn parse_link_local6(text: &str, iface: &str) -> Option<std::net::Ipv6Addr> {
    text.lines().find_map(|l| {
        let f: Vec<&str> = l.split_whitespace().collect();
        if f.len() != 6 || f[5] != iface || f[3] != "20" {
            return None;
        }
        u128::from_str_radix(f[0], 16).ok().map(std::net::Ipv6Addr::from)
    })
}

pub fn ifindex(iface: &str) -> Result<u32, NetError> {
    let name = CString::new(iface).map_err(|_| NetError::NoSuchInterface {
        iface: iface.to_owned(),
    })?;
    // SAFETY: name is a valid C string.
    match unsafe { libc::if_nametoindex(name.as_ptr()) } {
        0 => Err(NetError::NoSuchInterface {
            iface: iface.to_owned(),
        }),
        i => Ok(i),
    }
}

pub fn iface_name(index: u32) -> Option<String> {
    let mut buf = [0 as libc::c_char; libc::IF_NAMESIZE];
    // SAFETY: buf has IF_NAMESIZE bytes as the call requires.
    let p = unsafe { libc::if_indextoname(index, buf.as_mut_ptr()) };
    if p.is_null() {
        return None;
    }
    // SAFETY: on success buf holds a C string.
    Some(
        unsafe { CStr::from_ptr(buf.as_ptr()) }
            .to_string_lossy()
            .into_owned(),
    )
}

/// Every interface of this network namespace, by name (if_nameindex: netlink, not /sys, which
/// may show another namespace).
pub fn interfaces() -> Vec<String> {
    // SAFETY: if_nameindex returns a list ending in a zero entry, freed below.
    let list = unsafe { libc::if_nameindex() };
    if list.is_null() {
        return Vec::new();
    }
    let mut out = Vec::new();
    let mut cur = list;
    // SAFETY: each entry up to the terminating one is valid, with a C string name.
    unsafe {
        while (*cur).if_index != 0 && !(*cur).if_name.is_null() {
            out.push(CStr::from_ptr((*cur).if_name).to_string_lossy().into_owned());
            cur = cur.add(1);
        }
        libc::if_freenameindex(list);
    }
    out
}

/// The interface's hardware address (SIOCGIFHWADDR).
pub fn mac_of(iface: &str) -> Result<[u8; 6], NetError> {
    hwaddr(iface).map(|(_, mac)| mac)
}

/// An 802.1Q VLAN subinterface (`eth0.20`): its parent and its VLAN id.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Vlan {
    pub parent: String,
    pub id: u16,
}

/// Whether `iface` is a VLAN subinterface, and of what: from `/proc/net/vlan/config`, which
/// the kernel's 802.1Q module keeps for the network namespace of the reader (sysfs shows the
/// namespace it was mounted in, which is not always the agent's).
pub fn vlan_of(iface: &str) -> Option<Vlan> {
    parse_vlan_config(&std::fs::read_to_string("/proc/net/vlan/config").ok()?, iface)
}

/// A line of `/proc/net/vlan/config` (after its two header lines): `eth0.20 | 20 | eth0`.
fn parse_vlan_config(text: &str, iface: &str) -> Option<Vlan> {
    text.lines().find_map(|l| {
        let mut f = l.split('|').map(str::trim);
        let (name, id, parent) = (f.next()?, f.next()?, f.next()?);
        if name != iface {
            return None;
        }
        Some(Vlan {
            parent: parent.to_owned(),
            id: id.parse().ok()?,
        })
    })
}

/// The interface carries Ethernet frames (ARPHRD_ETHER): a bridge or a veth does; an L3-only
/// device (ipvlan in L3 mode, a tunnel) has no L2 path to what is behind it.
pub fn is_ethernet(iface: &str) -> bool {
    hwaddr(iface).is_ok_and(|(family, _)| family == libc::ARPHRD_ETHER)
}

/// The interface is one end of a veth pair (its driver, as `ethtool -i` reads it): a packet
/// handed to it with `bpf_redirect_peer` enters its peer, the pod's `eth0`.
pub fn is_veth(iface: &str) -> bool {
    /// `struct ethtool_drvinfo` (linux/ethtool.h): the driver's name comes first after `cmd`.
    #[repr(C)]
    struct DrvInfo {
        cmd: u32,
        driver: [u8; 32],
        rest: [u8; 160],
    }
    const ETHTOOL_GDRVINFO: u32 = 3;
    let mut info = DrvInfo {
        cmd: ETHTOOL_GDRVINFO,
        driver: [0; 32],
        rest: [0; 160],
    };
    let mut req = ifreq(iface);
    req.ifr_ifru.ifru_data = (&raw mut info).cast();
    // The kernel fills `info` through the pointer, which outlives the call.
    ioctl(libc::SIOCETHTOOL, &mut req).is_ok() && info.driver.starts_with(b"veth\0")
}

/// An `ifreq` naming `iface` (cut to `IF_NAMESIZE - 1` bytes), the rest zero.
fn ifreq(iface: &str) -> libc::ifreq {
    // SAFETY: ifreq is plain data; zeroed is a valid value.
    let mut req: libc::ifreq = unsafe { std::mem::zeroed() };
    for (dst, src) in req
        .ifr_name
        .iter_mut()
        .zip(iface.as_bytes().iter().take(libc::IF_NAMESIZE - 1))
    {
        *dst = *src as libc::c_char;
    }
    req
}

/// An interface ioctl (`SIOC*`) on `req`, through a datagram socket opened for it.
fn ioctl(request: libc::c_ulong, req: &mut libc::ifreq) -> io::Result<()> {
    // SAFETY: a plain datagram socket for the ioctl, closed below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is open; req is a valid ifreq, and whatever it points at is the caller's.
    let rc = unsafe { libc::ioctl(fd, request, req as *mut libc::ifreq) };
    let e = io::Error::last_os_error();
    // SAFETY: fd is ours.
    unsafe { libc::close(fd) };
    if rc == 0 { Ok(()) } else { Err(e) }
}

/// The interface's hardware address family and address.
fn hwaddr(iface: &str) -> Result<(u16, [u8; 6]), NetError> {
    let mut req = ifreq(iface);
    ioctl(libc::SIOCGIFHWADDR, &mut req).map_err(|source| NetError::Mac {
        iface: iface.to_owned(),
        source,
    })?;
    // SAFETY: the ioctl filled the hwaddr member of the union.
    let sa = unsafe { req.ifr_ifru.ifru_hwaddr };
    let mut mac = [0u8; 6];
    for (m, b) in mac.iter_mut().zip(sa.sa_data.iter()) {
        *m = *b as u8;
    }
    Ok((sa.sa_family, mac))
}

/// The device of the most specific route to `addr` in the main table (/proc/net/route), which
/// is where the pod network of a local backend hangs off (a bridge such as cni0, or a veth).
pub fn route_dev(addr: Ipv4Addr) -> Result<Option<String>, NetError> {
    let text = fs::read_to_string("/proc/self/net/route").map_err(|source| NetError::Proc {
        path: "/proc/self/net/route",
        source,
    })?;
    Ok(best_route(&text, addr))
}

fn best_route(table: &str, addr: Ipv4Addr) -> Option<String> {
    let a = u32::from(addr);
    let mut best: Option<(u32, String)> = None;
    for line in table.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 8 {
            continue;
        }
        // Destination and mask are printed as the in-memory (network order) u32, in hex.
        let (Ok(dst), Ok(mask)) = (u32::from_str_radix(f[1], 16), u32::from_str_radix(f[7], 16)) else {
            continue;
        };
        let (dst, mask) = (u32::from_be(dst.to_le()), u32::from_be(mask.to_le()));
        if a & mask == dst
            && best
                .as_ref()
                .is_none_or(|(m, _)| mask.count_ones() > m.count_ones())
        {
            best = Some((mask, f[0].to_owned()));
        }
    }
    best.map(|(_, dev)| dev)
}

/// Complete ARP entries (/proc/net/arp): address -> MAC.
pub fn neighbours() -> Result<BTreeMap<Ipv4Addr, [u8; 6]>, NetError> {
    let text = fs::read_to_string("/proc/self/net/arp").map_err(|source| NetError::Proc {
        path: "/proc/self/net/arp",
        source,
    })?;
    Ok(parse_arp(&text))
}

fn parse_arp(text: &str) -> BTreeMap<Ipv4Addr, [u8; 6]> {
    let mut out = BTreeMap::new();
    for line in text.lines().skip(1) {
        let f: Vec<&str> = line.split_whitespace().collect();
        if f.len() < 4 {
            continue;
        }
        let complete = u32::from_str_radix(f[2].trim_start_matches("0x"), 16).is_ok_and(|fl| fl & 0x2 != 0);
        let (Ok(ip), Some(mac)) = (f[0].parse(), parse_mac(f[3])) else {
            continue;
        };
        if complete && mac != [0; 6] {
            out.insert(ip, mac);
        }
    }
    out
}

pub fn parse_mac(s: &str) -> Option<[u8; 6]> {
    let mut mac = [0u8; 6];
    let mut parts = s.split(':');
    for m in &mut mac {
        *m = u8::from_str_radix(parts.next()?, 16).ok()?;
    }
    parts.next().is_none().then_some(mac)
}

pub fn format_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// Makes the kernel resolve `addr`'s MAC: one empty datagram to the discard port. The peer's
/// answer (if any) does not matter; the ARP exchange that precedes it does.
pub fn solicit(addr: Ipv4Addr) {
    if let Ok(s) = UdpSocket::bind((Ipv4Addr::UNSPECIFIED, 0)) {
        let _ = s.send_to(&[], (addr, 9));
    }
}

/// Where a bridge has learned a MAC address, from its forwarding database (an `AF_BRIDGE`
/// neighbour dump over rtnetlink, which reads this network namespace, as `bridge fdb` does).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum BridgePort {
    /// `dev` is no bridge's master: it is the link itself (a routed CNI's veth).
    NotABridge,
    /// The bridge port (an ifindex) behind which the MAC lives.
    Port(u32),
    /// A bridge that has not learned the MAC (yet).
    Unknown,
}

/// The port of bridge `dev` (an ifindex) behind which `mac` lives.
pub fn bridge_port(dev: u32, mac: [u8; 6]) -> Result<BridgePort, NetError> {
    Ok(Fdb::read()?.port(dev, mac))
}

/// The forwarding databases of this network namespace's bridges, read once for several
/// questions.
pub struct Fdb(Vec<FdbEntry>);

impl Fdb {
    pub fn read() -> Result<Self, NetError> {
        fdb_dump().map(Fdb).map_err(NetError::Netlink)
    }

    /// The port of bridge `dev` (an ifindex) behind which `mac` lives.
    pub fn port(&self, dev: u32, mac: [u8; 6]) -> BridgePort {
        let mut bridge = false;
        for e in self.0.iter().filter(|e| e.master == dev) {
            bridge = true;
            if e.mac == mac && e.port != dev {
                return BridgePort::Port(e.port);
            }
        }
        if bridge {
            BridgePort::Unknown
        } else {
            BridgePort::NotABridge
        }
    }
}

/// One forwarding-database entry: `mac` behind port `port` of bridge `master`.
struct FdbEntry {
    mac: [u8; 6],
    port: u32,
    master: u32,
}

const RTM_GETNEIGH: u16 = 30;
const RTM_NEWNEIGH: u16 = 28;
const NLMSG_ERROR: u16 = 2;
const NLMSG_DONE: u16 = 3;
const NDA_LLADDR: u16 = 2;
const NDA_MASTER: u16 = 9;
/// nlmsghdr, then ndmsg (family, pad, pad, ifindex, state, flags, type).
const NLMSG_HDR: usize = 16;
const NDMSG: usize = 12;

fn fdb_dump() -> io::Result<Vec<FdbEntry>> {
    // SAFETY: plain socket call; the fd is closed by OwnedFd.
    let fd = unsafe {
        libc::socket(
            libc::AF_NETLINK,
            libc::SOCK_RAW | libc::SOCK_CLOEXEC,
            libc::NETLINK_ROUTE,
        )
    };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: fd is a fresh, valid descriptor that nothing else owns.
    let fd = unsafe { <std::os::fd::OwnedFd as std::os::fd::FromRawFd>::from_raw_fd(fd) };
    let raw = std::os::fd::AsRawFd::as_raw_fd(&fd);
    let mut req = [0u8; NLMSG_HDR + NDMSG];
    req[0..4].copy_from_slice(&((NLMSG_HDR + NDMSG) as u32).to_ne_bytes());
    req[4..6].copy_from_slice(&RTM_GETNEIGH.to_ne_bytes());
    req[6..8].copy_from_slice(&((libc::NLM_F_REQUEST | libc::NLM_F_DUMP) as u16).to_ne_bytes());
    req[8..12].copy_from_slice(&1u32.to_ne_bytes());
    req[NLMSG_HDR] = libc::AF_BRIDGE as u8;
    // SAFETY: req is a valid buffer of the given length.
    if unsafe { libc::send(raw, req.as_ptr().cast(), req.len(), 0) } < 0 {
        return Err(io::Error::last_os_error());
    }
    let mut out = Vec::new();
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        // SAFETY: buf is a valid, writable buffer of its length.
        let n = unsafe { libc::recv(raw, buf.as_mut_ptr().cast(), buf.len(), 0) };
        if n < 0 {
            return Err(io::Error::last_os_error());
        }
        if parse_fdb(&buf[..n as usize], &mut out)? {
            return Ok(out);
        }
    }
}

/// Parses one datagram of a neighbour dump into `out`; true at the end of the dump.
fn parse_fdb(mut msgs: &[u8], out: &mut Vec<FdbEntry>) -> io::Result<bool> {
    let u16_at = |b: &[u8], i: usize| u16::from_ne_bytes([b[i], b[i + 1]]);
    let u32_at = |b: &[u8], i: usize| u32::from_ne_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
    while msgs.len() >= NLMSG_HDR {
        let len = u32_at(msgs, 0) as usize;
        if len < NLMSG_HDR || len > msgs.len() {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "truncated netlink message",
            ));
        }
        let (msg, rest) = msgs.split_at(len);
        msgs = rest.get(((len + 3) & !3) - len..).unwrap_or_default();
        match u16_at(msg, 4) {
            NLMSG_DONE => return Ok(true),
            NLMSG_ERROR => {
                let errno = msg
                    .get(NLMSG_HDR..NLMSG_HDR + 4)
                    .map_or(0, |b| u32_at(b, 0) as i32);
                return Err(io::Error::from_raw_os_error(-errno));
            }
            RTM_NEWNEIGH if msg.len() >= NLMSG_HDR + NDMSG => {}
            _ => continue,
        }
        let port = u32_at(msg, NLMSG_HDR + 4);
        let mut attrs = &msg[NLMSG_HDR + NDMSG..];
        let (mut mac, mut master) = (None, 0);
        while attrs.len() >= 4 {
            let alen = u16_at(attrs, 0) as usize;
            if alen < 4 || alen > attrs.len() {
                break;
            }
            let data = &attrs[4..alen];
            match u16_at(attrs, 2) {
                NDA_LLADDR if data.len() == 6 => mac = data.try_into().ok(),
                NDA_MASTER if data.len() == 4 => master = u32_at(data, 0),
                _ => {}
            }
            attrs = attrs.get((alen + 3) & !3..).unwrap_or_default();
        }
        if let Some(mac) = mac {
            out.push(FdbEntry { mac, port, master });
        }
    }
    Ok(false)
}

/// Where the cgroup v2 hierarchy is mounted in this mount namespace (/proc/self/mountinfo), if
/// anywhere: /sys/fs/cgroup on a unified host, /sys/fs/cgroup/unified on a hybrid one.
pub fn cgroup2_mount() -> Result<Option<std::path::PathBuf>, NetError> {
    let text = fs::read_to_string("/proc/self/mountinfo").map_err(|source| NetError::Proc {
        path: "/proc/self/mountinfo",
        source,
    })?;
    Ok(parse_cgroup2_mount(&text))
}

fn parse_cgroup2_mount(mountinfo: &str) -> Option<std::path::PathBuf> {
    mountinfo.lines().find_map(|line| {
        let (mount, fs) = line.split_once(" - ")?;
        let point = mount.split(' ').nth(4)?;
        (fs.split(' ').next()? == "cgroup2").then(|| point.into())
    })
}

/// `path` is a directory of a cgroup v2 hierarchy.
pub fn is_cgroup2(path: &std::path::Path) -> bool {
    const CGROUP2_SUPER_MAGIC: i64 = 0x6367_7270;
    let Ok(c) = CString::new(path.as_os_str().as_encoded_bytes()) else {
        return false;
    };
    // SAFETY: statfs is plain data; zeroed is a valid value.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    // SAFETY: a valid C string and a statfs to fill.
    unsafe { libc::statfs(c.as_ptr(), &mut st) == 0 && st.f_type as i64 == CGROUP2_SUPER_MAGIC }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_vlan_subinterface_is_read_from_proc_net_vlan_config() {
        let text = "VLAN Dev name\t | VLAN ID\nName-Type: VLAN_NAME_TYPE_RAW_PLUS_VID_NO_PAD\neth0.20        | 20  | eth0\nbond0.300      | 300  | bond0\n";
        assert_eq!(
            parse_vlan_config(text, "eth0.20"),
            Some(Vlan {
                parent: "eth0".into(),
                id: 20
            })
        );
        assert_eq!(parse_vlan_config(text, "bond0.300").map(|v| v.id), Some(300));
        assert_eq!(parse_vlan_config(text, "eth0"), None);
        assert_eq!(parse_vlan_config("garbage", "eth0.20"), None);
    }

    #[test]
    fn the_link_local_address_is_read_from_proc_net_if_inet6() {
        // As this machine's /proc/net/if_inet6 writes it (global scope 00, link 20, host 10).
        let text = "fd000077000000000000000000000011 02 40 00 80     eth0\n\
                    fe80000000000000a8bbccfffe000011 02 40 20 80     eth0\n\
                    fe800000000000000000000000000001 03 40 20 80     cni0\n\
                    00000000000000000000000000000001 01 80 10 80       lo\n";
        assert_eq!(
            parse_link_local6(text, "eth0"),
            Some("fe80::a8bb:ccff:fe00:11".parse().expect("address"))
        );
        assert_eq!(
            parse_link_local6(text, "cni0"),
            Some("fe80::1".parse().expect("address"))
        );
        assert_eq!(parse_link_local6(text, "lo"), None);
        assert_eq!(parse_link_local6(text, "eth1"), None);
    }

    #[test]
    fn picks_the_longest_prefix() {
        let table = "Iface\tDestination\tGateway \tFlags\tRefCnt\tUse\tMetric\tMask\t\tMTU\tWindow\tIRTT\n\
eth0\t00000000\t0100000A\t0003\t0\t0\t0\t00000000\t0\t0\t0\n\
eth0\t0000000A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n\
cni0\t0001F40A\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n";
        assert_eq!(
            best_route(table, "10.244.1.2".parse().expect("test address")).as_deref(),
            Some("cni0")
        );
        assert_eq!(
            best_route(table, "10.0.0.7".parse().expect("test address")).as_deref(),
            Some("eth0")
        );
        assert_eq!(
            best_route(table, "8.8.8.8".parse().expect("test address")).as_deref(),
            Some("eth0")
        );
    }

    #[test]
    fn reads_complete_arp_entries_only() {
        let text = "IP address       HW type     Flags       HW address            Mask     Device\n\
10.0.0.12        0x1         0x2         aa:bb:cc:00:00:12     *        eth0\n\
10.0.0.13        0x1         0x0         00:00:00:00:00:00     *        eth0\n";
        let n = parse_arp(text);
        assert_eq!(n.len(), 1);
        assert_eq!(
            n[&"10.0.0.12".parse().expect("test address")],
            [0xaa, 0xbb, 0xcc, 0, 0, 0x12]
        );
    }

    #[test]
    fn loopback_exists() {
        assert_eq!(ifindex("lo").expect("lo"), 1);
        assert_eq!(iface_with_addr(Ipv4Addr::LOCALHOST).expect("lo"), "lo");
        assert_eq!(mac_of("lo").expect("lo mac"), [0; 6]);
    }

    #[test]
    fn cgroup2_is_found_on_unified_and_hybrid_hosts() {
        let hybrid = "31 24 0:27 / /sys/fs/cgroup ro,nosuid - tmpfs tmpfs ro,mode=755\n\
                      41 31 0:38 / /sys/fs/cgroup/unified rw,relatime - cgroup2 cgroup2 rw\n\
                      42 31 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw,memory\n";
        assert_eq!(parse_cgroup2_mount(hybrid), Some("/sys/fs/cgroup/unified".into()));
        let unified = "35 24 0:30 / /sys/fs/cgroup rw,nosuid shared:9 - cgroup2 cgroup2 rw,nsdelegate\n";
        assert_eq!(parse_cgroup2_mount(unified), Some("/sys/fs/cgroup".into()));
        assert_eq!(
            parse_cgroup2_mount("42 31 0:39 / /sys/fs/cgroup/memory rw - cgroup cgroup rw\n"),
            None
        );
    }

    #[test]
    fn loopback_and_missing_devices_are_no_l2_path() {
        // ARPHRD_LOOPBACK: frames, but not Ethernet ones a pod could sit behind.
        assert!(!is_ethernet("lo"));
        assert!(!is_ethernet("st8s-no-such-device"));
    }
}
