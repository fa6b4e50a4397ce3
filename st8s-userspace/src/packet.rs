//! Ethernet/IPv4/TCP/UDP frames (and IPv6 TCP frames) with correct checksums, and checksum
//! checks: the fixtures the BPF_PROG_TEST_RUN tests and benchmarks feed through the programs.

use std::net::{Ipv4Addr, Ipv6Addr};

pub const ETH_HLEN: usize = 14;
pub const IP_OFF: usize = ETH_HLEN;
pub const L4_OFF: usize = ETH_HLEN + 20;

#[derive(Clone, Copy, Debug)]
pub struct Frame {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv4Addr,
    pub dst: Ipv4Addr,
    pub sport: u16,
    pub dport: u16,
    /// 6 (TCP) or 17 (UDP).
    pub proto: u8,
    pub payload_len: usize,
    /// UDP only: send a zero checksum ("no checksum"), as RFC 768 allows.
    pub udp_no_checksum: bool,
    /// TCP only: the flags byte (`TCP_SYN` by default).
    pub tcp_flags: u8,
}

pub const TCP_SYN: u8 = 0x02;
pub const TCP_ACK: u8 = 0x10;

impl Frame {
    pub fn tcp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Frame {
            src_mac: [0x02, 0, 0, 0, 0, 0x64],
            dst_mac: [0x02, 0, 0, 0, 0, 0x0b],
            src,
            dst,
            sport,
            dport,
            proto: 6,
            payload_len: 16,
            udp_no_checksum: false,
            tcp_flags: TCP_SYN,
        }
    }

    pub fn udp(src: Ipv4Addr, sport: u16, dst: Ipv4Addr, dport: u16) -> Self {
        Frame {
            proto: 17,
            ..Self::tcp(src, sport, dst, dport)
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4_len = if self.proto == 6 { 20 } else { 8 } + self.payload_len;
        let tot = 20 + l4_len;
        let mut p = Vec::with_capacity(ETH_HLEN + tot);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        p.extend_from_slice(&0x0800u16.to_be_bytes());
        p.extend_from_slice(&[0x45, 0]);
        p.extend_from_slice(&(tot as u16).to_be_bytes());
        p.extend_from_slice(&[0x12, 0x34, 0x40, 0x00, 64, self.proto, 0, 0]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        if self.proto == 6 {
            // seq, ack, data offset 5, flags, window, csum, urg
            p.extend_from_slice(&[
                0,
                0,
                0,
                1,
                0,
                0,
                0,
                0,
                0x50,
                self.tcp_flags,
                0xff,
                0xff,
                0,
                0,
                0,
                0,
            ]);
        } else {
            p.extend_from_slice(&(l4_len as u16).to_be_bytes());
            p.extend_from_slice(&[0, 0]);
        }
        p.extend((0..self.payload_len).map(|i| i as u8));
        let c = fold(sum(&p[IP_OFF..IP_OFF + 20], 0));
        p[IP_OFF + 10..IP_OFF + 12].copy_from_slice(&c.to_be_bytes());
        if !(self.proto == 17 && self.udp_no_checksum) {
            let off = l4_csum_off(self.proto);
            let mut c = fold(sum(&p[L4_OFF..], pseudo(&p)));
            if c == 0 && self.proto == 17 {
                c = 0xffff;
            }
            p[off..off + 2].copy_from_slice(&c.to_be_bytes());
        }
        p
    }
}

/// An Ethernet/IPv6/TCP frame (no extension headers), the IPv6 counterpart of a TCP [`Frame`].
#[derive(Clone, Copy, Debug)]
pub struct Frame6 {
    pub src_mac: [u8; 6],
    pub dst_mac: [u8; 6],
    pub src: Ipv6Addr,
    pub dst: Ipv6Addr,
    pub sport: u16,
    pub dport: u16,
    pub payload_len: usize,
    pub tcp_flags: u8,
}

impl Frame6 {
    /// The IPv6 twin of `f` (a TCP frame): the same MACs, ports, flags and payload.
    pub fn like(f: &Frame, src: Ipv6Addr, dst: Ipv6Addr) -> Self {
        Frame6 {
            src_mac: f.src_mac,
            dst_mac: f.dst_mac,
            src,
            dst,
            sport: f.sport,
            dport: f.dport,
            payload_len: f.payload_len,
            tcp_flags: f.tcp_flags,
        }
    }

    pub fn build(&self) -> Vec<u8> {
        let l4_len = 20 + self.payload_len;
        let mut p = Vec::with_capacity(ETH_HLEN + 40 + l4_len);
        p.extend_from_slice(&self.dst_mac);
        p.extend_from_slice(&self.src_mac);
        p.extend_from_slice(&0x86ddu16.to_be_bytes());
        p.extend_from_slice(&[0x60, 0, 0, 0]);
        p.extend_from_slice(&(l4_len as u16).to_be_bytes());
        p.extend_from_slice(&[6, 64]);
        p.extend_from_slice(&self.src.octets());
        p.extend_from_slice(&self.dst.octets());
        let l4 = p.len();
        p.extend_from_slice(&self.sport.to_be_bytes());
        p.extend_from_slice(&self.dport.to_be_bytes());
        p.extend_from_slice(&[
            0,
            0,
            0,
            1,
            0,
            0,
            0,
            0,
            0x50,
            self.tcp_flags,
            0xff,
            0xff,
            0,
            0,
            0,
            0,
        ]);
        p.extend((0..self.payload_len).map(|i| i as u8));
        // RFC 8200 section 8.1: the pseudo-header is both addresses, the upper-layer length and
        // the next header.
        let pseudo = sum(&p[ETH_HLEN + 8..ETH_HLEN + 40], 0) + l4_len as u32 + 6;
        let c = fold(sum(&p[l4..], pseudo));
        p[l4 + 16..l4 + 18].copy_from_slice(&c.to_be_bytes());
        p
    }
}

/// Is an IPv6 frame's (no extension headers) TCP checksum right?
pub fn l4_checksum_ok6(p: &[u8]) -> bool {
    let l4 = ETH_HLEN + 40;
    let pseudo = sum(&p[ETH_HLEN + 8..l4], 0) + (p.len() - l4) as u32 + u32::from(p[ETH_HLEN + 6]);
    fold(sum(&p[l4..], pseudo)) == 0
}

pub fn l4_csum_off(proto: u8) -> usize {
    if proto == 6 { L4_OFF + 16 } else { L4_OFF + 6 }
}

fn sum(data: &[u8], init: u32) -> u32 {
    let mut s = init;
    for ch in data.chunks(2) {
        let w = if ch.len() == 2 {
            u16::from_be_bytes([ch[0], ch[1]])
        } else {
            u16::from(ch[0]) << 8
        };
        s += u32::from(w);
    }
    s
}

fn fold(mut s: u32) -> u16 {
    while s > 0xffff {
        s = (s & 0xffff) + (s >> 16);
    }
    !(s as u16)
}

fn pseudo(p: &[u8]) -> u32 {
    let tot = u16::from_be_bytes([p[IP_OFF + 2], p[IP_OFF + 3]]) as u32;
    let s = sum(&p[IP_OFF + 12..IP_OFF + 20], 0);
    s + u32::from(p[IP_OFF + 9]) + (tot - 20)
}

/// Is the IPv4 header checksum right?
pub fn ip_checksum_ok(p: &[u8]) -> bool {
    fold(sum(&p[IP_OFF..IP_OFF + 20], 0)) == 0
}

/// Is the TCP/UDP checksum right (a zero UDP checksum counts as right)?
pub fn l4_checksum_ok(p: &[u8]) -> bool {
    let proto = p[IP_OFF + 9];
    let off = l4_csum_off(proto);
    if proto == 17 && p[off] == 0 && p[off + 1] == 0 {
        return true;
    }
    fold(sum(&p[L4_OFF..], pseudo(p))) == 0
}

pub fn src_addr(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[IP_OFF + 12], p[IP_OFF + 13], p[IP_OFF + 14], p[IP_OFF + 15])
}

pub fn dst_addr(p: &[u8]) -> Ipv4Addr {
    Ipv4Addr::new(p[IP_OFF + 16], p[IP_OFF + 17], p[IP_OFF + 18], p[IP_OFF + 19])
}

pub fn src_port(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[L4_OFF], p[L4_OFF + 1]])
}

pub fn dst_port(p: &[u8]) -> u16 {
    u16::from_be_bytes([p[L4_OFF + 2], p[L4_OFF + 3]])
}

/// Recomputes the IPv4 header checksum after a test edits the header by hand.
pub fn fix_ip_checksum(p: &mut [u8], ihl_bytes: usize) {
    p[IP_OFF + 10] = 0;
    p[IP_OFF + 11] = 0;
    let c = fold(sum(&p[IP_OFF..IP_OFF + ihl_bytes], 0));
    p[IP_OFF + 10..IP_OFF + 12].copy_from_slice(&c.to_be_bytes());
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn built_ipv6_frames_have_valid_checksums() {
        let f = Frame::tcp(
            "10.0.0.1".parse().expect("a"),
            1000,
            "10.0.0.2".parse().expect("a"),
            80,
        );
        let p = Frame6::like(&f, "fd00::1".parse().expect("a"), "fd00::2".parse().expect("a")).build();
        assert_eq!(p.len(), 14 + 40 + 20 + f.payload_len);
        assert!(l4_checksum_ok6(&p));
        // The same verdict from a parser that shares no code with this one.
        let sliced = etherparse::SlicedPacket::from_ethernet(&p).expect("etherparse reads it");
        let (Some(etherparse::NetSlice::Ipv6(ip)), Some(etherparse::TransportSlice::Tcp(t))) =
            (sliced.net, sliced.transport)
        else {
            panic!("not IPv6/TCP")
        };
        let h = ip.header();
        assert_eq!(
            t.calc_checksum_ipv6(h.source(), h.destination()).ok(),
            Some(t.checksum())
        );
        let mut bad = p.clone();
        bad[14 + 8] ^= 1;
        assert!(!l4_checksum_ok6(&bad), "the source address is covered");
    }

    #[test]
    fn built_frames_have_valid_checksums() {
        let a: Ipv4Addr = "10.0.0.1".parse().expect("test address");
        let b: Ipv4Addr = "10.0.0.2".parse().expect("test address");
        for f in [Frame::tcp(a, 1000, b, 80), Frame::udp(a, 1000, b, 53)] {
            let p = f.build();
            assert!(ip_checksum_ok(&p));
            assert!(l4_checksum_ok(&p));
            let mut bad = p.clone();
            let last = bad.len() - 1;
            bad[last] ^= 0xff;
            assert!(!l4_checksum_ok(&bad), "a corrupted payload must fail the check");
        }
    }
}
