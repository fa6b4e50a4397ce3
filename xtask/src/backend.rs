//! The lab's backend pods: a small HTTP server and a DNS server (UDP and TCP) that answer with the
//! pod's name and the client address they saw, which is what the lab and the tests check.
//!
//! HTTP: `GET /` -> `pod=<name> client=<ip>:<port>` (keep-alive supported); a request with a
//! body (`Content-Length`) is read whole first and answered with `received=<bytes>` added.
//! DNS: any query -> one TXT record `pod=<name> client=<ip>:<port>` for the question's name.
//! Discovery (UDP): any datagram -> `pod=<name> client=<ip>:<port> ttl=<IP TTL>`, sent back to the asker; a
//! datagram from port 5353 (an mDNS querier) is answered by multicast to 224.0.0.251:5353, as
//! mDNS responders do. The sockets are bound as the real servers of those ports bind them (see
//! `discovery_sockets`).

use std::{
    io::{BufRead as _, BufReader, Read as _, Write as _},
    net::{Ipv4Addr, Ipv6Addr, SocketAddr, TcpListener, TcpStream, UdpSocket},
    sync::Arc,
    thread,
};

use anyhow::Context as _;

/// The pod's own address and prefix length, which the discovery servers bind to as real servers
/// do.
#[derive(Clone, Copy, Debug)]
pub struct PodAddr {
    pub addr: Ipv4Addr,
    pub prefix: u8,
}

impl std::str::FromStr for PodAddr {
    type Err = anyhow::Error;

    fn from_str(s: &str) -> anyhow::Result<Self> {
        let (addr, prefix) = s.split_once('/').context("address/prefix")?;
        Ok(PodAddr {
            addr: addr.parse()?,
            prefix: prefix.parse()?,
        })
    }
}

impl PodAddr {
    pub fn broadcast(self) -> Ipv4Addr {
        let host_bits = u32::MAX.checked_shr(u32::from(self.prefix)).unwrap_or(0);
        Ipv4Addr::from(u32::from(self.addr) | host_bits)
    }
}

const SSDP_GROUP: Ipv4Addr = Ipv4Addr::new(239, 255, 255, 250);
const MDNS_GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);

pub fn serve(
    name: String,
    http: Option<u16>,
    dns: Option<u16>,
    discovery: &[u16],
    addr: Option<PodAddr>,
) -> anyhow::Result<()> {
    let name = Arc::new(name);
    let mut threads = Vec::new();
    for &port in discovery {
        let (listen, reply) = discovery_sockets(port, addr)?;
        for u in listen {
            let n = name.clone();
            let reply = reply.try_clone()?;
            report_ttl(&u)?;
            threads.push(thread::spawn(move || {
                let mut buf = [0u8; 1500];
                while let Ok((peer, ttl)) = recv_with_ttl(&u, &mut buf) {
                    let text = format!("pod={n} client={peer} ttl={ttl}");
                    let to: SocketAddr = if peer.port() == 5353 {
                        SocketAddr::from(([224, 0, 0, 251], 5353))
                    } else {
                        peer
                    };
                    let _ = reply.send_to(text.as_bytes(), to);
                }
            }));
        }
    }
    // HTTP and DNS listen as CoreDNS and Traefik do (Go's `net.Listen("tcp", ":53")` and
    // `ListenPacket("udp", ":53")`): one IPv6 socket for both families (IPV6_V6ONLY off, the
    // kernel's default), IPv4 clients appearing as v4-mapped addresses, shown unmapped here.
    if let Some(port) = http {
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .with_context(|| format!("binding http :{port}"))?;
        let n = name.clone();
        threads.push(thread::spawn(move || {
            for s in l.incoming().flatten() {
                let n = n.clone();
                thread::spawn(move || http_conn(s, &n));
            }
        }));
    }
    if let Some(port) = dns {
        let u = UdpSocket::bind((Ipv6Addr::UNSPECIFIED, port))
            .with_context(|| format!("binding dns udp :{port}"))?;
        let n = name.clone();
        threads.push(thread::spawn(move || {
            let mut buf = [0u8; 1500];
            while let Ok((len, peer)) = u.recv_from(&mut buf) {
                if let Some(reply) = dns_answer(&buf[..len], &n, unmapped(peer), 512) {
                    let _ = u.send_to(&reply, peer);
                }
            }
        }));
        let l = TcpListener::bind((Ipv6Addr::UNSPECIFIED, port))
            .with_context(|| format!("binding dns tcp :{port}"))?;
        let n = name.clone();
        threads.push(thread::spawn(move || {
            for s in l.incoming().flatten() {
                let n = n.clone();
                thread::spawn(move || dns_tcp_conn(s, &n));
            }
        }));
    }
    eprintln!("backend {name}: serving (http {http:?}, dns {dns:?}, discovery {discovery:?})");
    for t in threads {
        let _ = t.join();
    }
    Ok(())
}

/// A peer as the application shows it: an IPv4 client on a dual-stack socket as IPv4.
fn unmapped(peer: SocketAddr) -> SocketAddr {
    SocketAddr::new(peer.ip().to_canonical(), peer.port())
}

fn http_conn(s: TcpStream, name: &str) {
    let Ok(peer) = s.peer_addr().map(unmapped) else {
        return;
    };
    let Ok(mut w) = s.try_clone() else { return };
    let mut r = BufReader::new(s);
    loop {
        let mut line = String::new();
        let mut close = false;
        let mut length = 0u64;
        // Request line and headers up to the blank line.
        let mut first = true;
        loop {
            line.clear();
            match r.read_line(&mut line) {
                Ok(0) | Err(_) => return,
                Ok(_) => {}
            }
            if first && line.trim().is_empty() {
                continue;
            }
            first = false;
            let l = line.to_ascii_lowercase();
            if l.starts_with("connection:") && l.contains("close") {
                close = true;
            }
            if let Some(v) = l.strip_prefix("content-length:") {
                length = v.trim().parse().unwrap_or(0);
            }
            if line == "\r\n" || line == "\n" {
                break;
            }
        }
        // A body is read to its end before the answer, as a web server that does not use it
        // still does (nginx discards it by reading it, `ngx_http_discard_request_body`): an
        // upload is the client's bulk transfer the tests send through st8s.
        let received = std::io::copy(&mut (&mut r).take(length), &mut std::io::sink()).unwrap_or(0);
        if received < length {
            return;
        }
        let body = if length > 0 {
            format!("pod={name} client={peer} received={received}\n")
        } else {
            format!("pod={name} client={peer}\n")
        };
        let head = format!(
            "HTTP/1.1 200 OK\r\nContent-Type: text/plain\r\nContent-Length: {}\r\n{}\r\n",
            body.len(),
            if close { "Connection: close\r\n" } else { "" }
        );
        if w.write_all(head.as_bytes())
            .and_then(|_| w.write_all(body.as_bytes()))
            .is_err()
            || close
        {
            return;
        }
    }
}

fn dns_tcp_conn(mut s: TcpStream, name: &str) {
    let Ok(peer) = s.peer_addr().map(unmapped) else {
        return;
    };
    loop {
        let mut len = [0u8; 2];
        if s.read_exact(&mut len).is_err() {
            return;
        }
        let mut q = vec![0u8; u16::from_be_bytes(len) as usize];
        if s.read_exact(&mut q).is_err() {
            return;
        }
        let Some(a) = dns_answer(&q, name, peer, 65535) else {
            return;
        };
        let mut out = (a.len() as u16).to_be_bytes().to_vec();
        out.extend(a);
        if s.write_all(&out).is_err() {
            return;
        }
    }
}

/// Answers a standard query with one TXT record; `None` for anything that is not a query.
pub fn dns_answer(q: &[u8], name: &str, peer: SocketAddr, _max: usize) -> Option<Vec<u8>> {
    if q.len() < 12 || q[2] & 0x80 != 0 || u16::from_be_bytes([q[4], q[5]]) != 1 {
        return None;
    }
    // Walk the question name (labels only, no compression in a question).
    let mut i = 12;
    loop {
        let l = *q.get(i)? as usize;
        if l == 0 {
            i += 1;
            break;
        }
        if l > 63 {
            return None;
        }
        i += 1 + l;
    }
    let qend = i + 4;
    if q.len() < qend {
        return None;
    }
    let txt = format!("pod={name} client={peer}");
    let txt = &txt.as_bytes()[..txt.len().min(255)];
    let mut r = Vec::with_capacity(qend + 16 + txt.len());
    r.extend_from_slice(&q[0..2]); // id
    r.push(0x84 | (q[2] & 0x01)); // QR, AA, RD copied
    r.push(0x00); // RCODE 0
    r.extend_from_slice(&[0, 1, 0, 1, 0, 0, 0, 0]); // QD=1 AN=1 NS=0 AR=0
    r.extend_from_slice(&q[12..qend]);
    r.extend_from_slice(&[0xc0, 12]); // name: pointer to the question
    r.extend_from_slice(&[0, 16, 0, 1]); // TXT IN
    r.extend_from_slice(&[0, 0, 0, 5]); // TTL 5
    r.extend_from_slice(&((txt.len() + 1) as u16).to_be_bytes());
    r.push(txt.len() as u8);
    r.extend_from_slice(txt);
    Some(r)
}

/// The sockets a discovery server listens on, and the one it answers from, bound as the real
/// servers bind them (with `addr`, the pod's address; without it, all on 0.0.0.0):
/// - 7359, as Jellyfin 10.9 on Linux (Jellyfin.Networking/AutoDiscoveryHost.cs of that release):
///   255.255.255.255 and the interface's subnet broadcast, never 0.0.0.0; answers from a socket
///   bound to its own address. (Later releases bind 0.0.0.0, which the other ports cover.)
/// - 1900, as SSDP stacks that bind the group (gupnp/libupnp style): 239.255.255.250, joined on
///   the pod's interface; answers from its own address.
/// - 5353, as mDNS responders (avahi-core/socket.c): 0.0.0.0, joined to 224.0.0.251.
/// - any other port: 0.0.0.0.
fn discovery_sockets(port: u16, addr: Option<PodAddr>) -> anyhow::Result<(Vec<UdpSocket>, UdpSocket)> {
    let bind =
        |ip: Ipv4Addr| bind_shared(ip, port).with_context(|| format!("binding discovery udp {ip}:{port}"));
    match (port, addr) {
        (7359, Some(a)) => Ok((
            vec![bind(Ipv4Addr::BROADCAST)?, bind(a.broadcast())?],
            bind(a.addr)?,
        )),
        (1900, Some(a)) => {
            let group = bind(SSDP_GROUP)?;
            group
                .join_multicast_v4(&SSDP_GROUP, &a.addr)
                .context("joining the SSDP group")?;
            Ok((vec![group], bind(a.addr)?))
        }
        (5353, Some(a)) => {
            let any = bind(Ipv4Addr::UNSPECIFIED)?;
            any.join_multicast_v4(&MDNS_GROUP, &a.addr)
                .context("joining the mDNS group")?;
            // Its own multicast answers must not come back as queries (avahi drops packets from
            // its own addresses for the same reason).
            any.set_multicast_loop_v4(false)?;
            let reply = any.try_clone()?;
            Ok((vec![any], reply))
        }
        _ => {
            let any = bind(Ipv4Addr::UNSPECIFIED)?;
            let reply = any.try_clone()?;
            Ok((vec![any], reply))
        }
    }
}

/// Asks the kernel for each datagram's IP TTL (IP_RECVTTL), which the answers report: mDNS
/// receivers treat a TTL other than 255 as off-link (RFC 6762 section 11).
fn report_ttl(u: &UdpSocket) -> std::io::Result<()> {
    crate::set_int_option(u, libc::IPPROTO_IP, libc::IP_RECVTTL, 1)
}

/// One datagram: its sender and the IP TTL it arrived with (0 when the kernel gave none).
fn recv_with_ttl(u: &UdpSocket, buf: &mut [u8]) -> std::io::Result<(SocketAddr, i32)> {
    use std::os::fd::AsRawFd as _;
    // SAFETY: plain data; zeroed is a valid value.
    let mut from: libc::sockaddr_in = unsafe { std::mem::zeroed() };
    let mut control = [0u64; 8];
    let mut iov = libc::iovec {
        iov_base: buf.as_mut_ptr().cast(),
        iov_len: buf.len(),
    };
    // SAFETY: plain data; zeroed is a valid value.
    let mut msg: libc::msghdr = unsafe { std::mem::zeroed() };
    msg.msg_name = (&mut from as *mut libc::sockaddr_in).cast();
    msg.msg_namelen = std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t;
    msg.msg_iov = &mut iov;
    msg.msg_iovlen = 1;
    msg.msg_control = control.as_mut_ptr().cast();
    msg.msg_controllen = std::mem::size_of_val(&control);
    // SAFETY: every pointer in msg points at live buffers of the given sizes.
    if unsafe { libc::recvmsg(u.as_raw_fd(), &mut msg, 0) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    let mut ttl = 0;
    // SAFETY: the kernel filled msg_control; the CMSG macros walk it within msg_controllen.
    unsafe {
        let mut c = libc::CMSG_FIRSTHDR(&msg);
        while !c.is_null() {
            if (*c).cmsg_level == libc::IPPROTO_IP && (*c).cmsg_type == libc::IP_TTL {
                ttl = std::ptr::read_unaligned(libc::CMSG_DATA(c).cast::<libc::c_int>());
            }
            c = libc::CMSG_NXTHDR(&msg, c);
        }
    }
    let peer = SocketAddr::from((
        Ipv4Addr::from(u32::from_be(from.sin_addr.s_addr)),
        u16::from_be(from.sin_port),
    ));
    Ok((peer, ttl))
}

/// A UDP socket bound with SO_REUSEADDR, so that several can share the port on different
/// addresses, as the servers above do.
fn bind_shared(ip: Ipv4Addr, port: u16) -> std::io::Result<UdpSocket> {
    use std::os::fd::FromRawFd as _;
    // SAFETY: plain socket call; the fd is owned by the UdpSocket made from it below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    if fd < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: fd is fresh and owned by nothing else.
    let sock = unsafe { UdpSocket::from_raw_fd(fd) };
    let one: libc::c_int = 1;
    // SAFETY: valid fd and option buffer.
    let rc = unsafe {
        libc::setsockopt(
            fd,
            libc::SOL_SOCKET,
            libc::SO_REUSEADDR,
            (&one as *const libc::c_int).cast(),
            std::mem::size_of::<libc::c_int>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    let sa = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: port.to_be(),
        sin_addr: libc::in_addr {
            s_addr: u32::from(ip).to_be(),
        },
        sin_zero: [0; 8],
    };
    // SAFETY: valid fd and a sockaddr_in of the given size.
    let rc = unsafe {
        libc::bind(
            fd,
            (&sa as *const libc::sockaddr_in).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(sock)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn answers_a_txt_query() {
        // id 0x1234, RD, one question: "a.lab" TXT IN
        let q = [
            0x12, 0x34, 1, 0, 0, 1, 0, 0, 0, 0, 0, 0, 1, b'a', 3, b'l', b'a', b'b', 0, 0, 16, 0, 1,
        ];
        let r =
            dns_answer(&q, "ns/dns", "10.0.0.1:5000".parse().expect("test address"), 512).expect("answer");
        assert_eq!(&r[0..2], &[0x12, 0x34]);
        assert_eq!(r[2] & 0x80, 0x80);
        assert_eq!(&r[6..8], &[0, 1], "one answer");
        let text = String::from_utf8_lossy(&r);
        assert!(text.contains("pod=ns/dns client=10.0.0.1:5000"), "{text}");
        assert!(
            dns_answer(&r, "x", "10.0.0.1:1".parse().expect("test address"), 512).is_none(),
            "responses are not answered"
        );
    }
}
