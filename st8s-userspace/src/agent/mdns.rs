//! `st8s agent --mdns`: listens for mDNS on the uplink, keeps the table of `.local` hosts
//! ([`crate::dns::mdns::Hosts`]) and hands it to the Lease renewer, which publishes it for
//! `st8s dns`. It only listens and asks: it never answers, so it cannot take a name from a device.

use std::{
    collections::BTreeMap,
    net::{Ipv4Addr, SocketAddrV4},
    os::fd::{AsRawFd as _, FromRawFd as _, OwnedFd},
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::sync::watch;
use tracing::{debug, info, warn};

use crate::{
    dataplane::net,
    dns::mdns::{self, Event, Hosts},
};

/// The hosts heard, as the Lease carries them.
pub type Heard = BTreeMap<String, Vec<Ipv4Addr>>;

/// How often the service types are browsed again, at the most (hosts that announced before the
/// agent started, or whose announcement was lost, are found this way).
const BROWSE_EVERY: Duration = Duration::from_secs(300);

/// The gap before the next browse: RFC 6762 section 5.2's continuous querying, one second after
/// the first query and doubling from there (a query lost at start, or sent before a responder
/// was up, is repeated within seconds), up to [`BROWSE_EVERY`].
fn next_browse_gap(gap: Duration) -> Duration {
    (gap * 2).min(BROWSE_EVERY)
}

/// A UDP socket on 0.0.0.0:5353 shared with any other mDNS stack on the host (avahi-daemon sets
/// SO_REUSEADDR too), joined to 224.0.0.251 on the uplink only (IP_MULTICAST_ALL off), sending
/// there with TTL 255 and without looping its own queries back.
fn socket(iface_addr: Ipv4Addr) -> anyhow::Result<std::net::UdpSocket> {
    // SAFETY: plain socket(2); the fd is owned right below.
    let fd = unsafe { libc::socket(libc::AF_INET, libc::SOCK_DGRAM | libc::SOCK_CLOEXEC, 0) };
    anyhow::ensure!(fd >= 0, "socket: {}", std::io::Error::last_os_error());
    // SAFETY: fd is a fresh socket nothing else owns.
    let fd = unsafe { OwnedFd::from_raw_fd(fd) };
    let set = |level, name, value: &[u8]| -> anyhow::Result<()> {
        // SAFETY: the option's value and its length.
        let rc = unsafe {
            libc::setsockopt(
                fd.as_raw_fd(),
                level,
                name,
                value.as_ptr().cast(),
                value.len() as libc::socklen_t,
            )
        };
        anyhow::ensure!(
            rc == 0,
            "setsockopt {level}/{name}: {}",
            std::io::Error::last_os_error()
        );
        Ok(())
    };
    let one = 1i32.to_ne_bytes();
    set(libc::SOL_SOCKET, libc::SO_REUSEADDR, &one)?;
    set(libc::SOL_SOCKET, libc::SO_REUSEPORT, &one)?;
    set(libc::IPPROTO_IP, libc::IP_MULTICAST_ALL, &0i32.to_ne_bytes())?;
    // The uplink's address in network order, as in_addr holds it.
    set(libc::IPPROTO_IP, libc::IP_MULTICAST_IF, &iface_addr.octets())?;
    let addr = libc::sockaddr_in {
        sin_family: libc::AF_INET as libc::sa_family_t,
        sin_port: mdns::PORT.to_be(),
        sin_addr: libc::in_addr { s_addr: 0 },
        sin_zero: [0; 8],
    };
    // SAFETY: a sockaddr_in of its own size.
    let rc = unsafe {
        libc::bind(
            fd.as_raw_fd(),
            (&raw const addr).cast(),
            std::mem::size_of::<libc::sockaddr_in>() as libc::socklen_t,
        )
    };
    anyhow::ensure!(
        rc == 0,
        "binding 0.0.0.0:5353: {}",
        std::io::Error::last_os_error()
    );
    let sock = std::net::UdpSocket::from(fd);
    sock.join_multicast_v4(&mdns::GROUP, &iface_addr)
        .context("joining 224.0.0.251")?;
    sock.set_multicast_ttl_v4(255)?;
    sock.set_multicast_loop_v4(false)?;
    sock.set_nonblocking(true)?;
    Ok(sock)
}

/// Starts listening on `iface`; what it hears goes to `heard`. Errors are logged once and the
/// listener stops (the rest of the agent is not affected).
pub fn spawn(iface: String, heard: watch::Sender<Heard>) {
    tokio::spawn(async move {
        if let Err(e) = listen(&iface, &heard).await {
            warn!(iface = %iface, error = format!("{e:#}"), "mDNS listener stopped; no .local hosts are published from this node");
        }
    });
}

async fn listen(iface: &str, heard: &watch::Sender<Heard>) -> anyhow::Result<()> {
    let subnets = net::subnets(iface)?;
    let first = subnets
        .first()
        .with_context(|| format!("{iface} has no IPv4 address"))?
        .addr;
    let sock = tokio::net::UdpSocket::from_std(socket(first)?)?;
    let group = SocketAddrV4::new(mdns::GROUP, mdns::PORT);
    info!(iface = %iface, subnets = ?subnets.iter().map(|s| format!("{}/{}", s.addr, u32::from(s.mask).count_ones())).collect::<Vec<_>>(), "listening for mDNS hosts");
    let mut hosts = Hosts::new(subnets);
    let mut buf = vec![0u8; 9000];
    let mut next_browse = Instant::now();
    let mut browse_gap = Duration::from_secs(1);
    loop {
        let now = Instant::now();
        if now >= next_browse {
            let _ = sock
                .send_to(&mdns::browse_query(&[mdns::SERVICES.to_owned()]), group)
                .await;
            next_browse = now + browse_gap;
            browse_gap = next_browse_gap(browse_gap);
        }
        let deadline = hosts.next_deadline().map_or(next_browse, |d| d.min(next_browse));
        let mut events = Vec::new();
        tokio::select! {
            r = sock.recv_from(&mut buf) => {
                let (len, from) = r.context("receiving")?;
                let std::net::SocketAddr::V4(from) = from else { continue };
                match mdns::parse_response(&buf[..len]) {
                    Ok(records) => {
                        let learned = hosts.learn(*from.ip(), &records, Instant::now());
                        if !learned.service_types.is_empty() {
                            let _ = sock.send_to(&mdns::browse_query(&learned.service_types), group).await;
                        }
                        events = learned.events;
                    }
                    Err(e) => debug!(from = %from, error = %e, "mDNS message not understood"),
                }
            }
            () = tokio::time::sleep_until(deadline.into()) => {
                let now = Instant::now();
                events = hosts.expire(now);
                let due = hosts.due(now);
                if !due.is_empty() {
                    let _ = sock.send_to(&mdns::host_query(&due), group).await;
                }
            }
        }
        for e in &events {
            log(iface, e);
        }
        if !events.is_empty() {
            heard.send_if_modified(|h| {
                let now = hosts.snapshot();
                let changed = *h != now;
                *h = now;
                changed
            });
        }
    }
}

fn log(iface: &str, e: &Event) {
    match e {
        Event::Added { host, addr } => info!(iface, host = %host, addr = %addr, "mDNS host heard"),
        Event::Removed { host, addr, why } => {
            info!(iface, host = %host, addr = %addr, why = ?why, "mDNS host gone")
        }
        Event::Conflict {
            host,
            first,
            second,
            addrs,
        } => {
            warn!(iface, host = %host, first = %first, second = %second, addrs = ?addrs, "two devices announce one .local name; the first keeps it")
        }
        Event::Skipped { name, why } => warn!(iface, name = %name, "mDNS name not published: {why}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn browsing_repeats_after_one_second_and_doubles_up_to_five_minutes() {
        let mut gap = Duration::from_secs(1);
        let mut gaps = vec![gap];
        while gap < BROWSE_EVERY {
            gap = next_browse_gap(gap);
            gaps.push(gap);
        }
        let secs: Vec<u64> = gaps.iter().map(Duration::as_secs).collect();
        assert_eq!(secs, [1, 2, 4, 8, 16, 32, 64, 128, 256, 300]);
        assert_eq!(next_browse_gap(BROWSE_EVERY), BROWSE_EVERY);
    }
}
