//! The LAN's mDNS hosts (RFC 6762) as an agent hears them, for `st8s dns` to answer
//! `<host>.local` as `<host>.<zone>.<domain>`. Pure: messages and instants in, a host table
//! and the queries to send out; the socket is the agent's (`agent::mdns`).
//!
//! What it keeps, and why:
//! - only A records of single-label `.local` names (`stuchip.local`), lowercased, that are valid
//!   DNS labels, whose address and sender are on the uplink's own subnets: a pod's address (an
//!   mDNS responder in a pod announces its pod IP, which reaches the LAN through its node) is
//!   never on them, nor is anything from off the link;
//! - a record lives for its TTL; a goodbye (TTL 0, RFC 6762 §10.1) removes it, and a record with
//!   the cache-flush bit replaces the addresses of its name learned more than a second before
//!   (§10.2);
//! - before a record runs out it is asked for again, at 80 % and 90 % of its TTL (§5.2 asks at
//!   80, 85, 90 and 95 %); a host that does not answer leaves when its TTL ends;
//! - a name that a second sender announces with other addresses is a conflict (§9): it is reported
//!   and the first sender keeps the name until its records go;
//! - hosts that announced themselves before the agent started are found by browsing (RFC 6763
//!   §9: `_services._dns-sd._udp.local` lists the service types, a query per type brings the
//!   instances with their hosts' addresses as additional records).

use std::{
    collections::{BTreeMap, BTreeSet},
    net::Ipv4Addr,
    time::{Duration, Instant},
};

/// The mDNS group and port.
pub const GROUP: Ipv4Addr = Ipv4Addr::new(224, 0, 0, 251);
pub const PORT: u16 = 5353;
/// The agent publishes what it hears on its Lease under this annotation (JSON: host -> addresses).
pub const HOSTS_ANNOTATION: &str = "st8s.io/mdns-hosts";
/// The DNS-SD meta-query that lists the service types on the link.
pub const SERVICES: &str = "_services._dns-sd._udp.local";
/// Bounds: service types asked for per browse, names kept, addresses per name.
pub const MAX_TYPES: usize = 64;
pub const MAX_HOSTS: usize = 512;
pub const MAX_ADDRS: usize = 8;

const TYPE_A: u16 = 1;
const TYPE_PTR: u16 = 12;
const CLASS_IN: u16 = 1;
const CACHE_FLUSH: u16 = 0x8000;

/// What st8s reads of one resource record.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Record {
    /// Owner name, lowercased, without the trailing dot.
    pub name: String,
    pub flush: bool,
    pub ttl: u32,
    pub data: Data,
}

#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Data {
    A(Ipv4Addr),
    Ptr(String),
    Other,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum ParseError {
    #[error("truncated message")]
    Truncated,
    #[error("bad name (a compression loop, a label over 63 bytes or a name over 255)")]
    BadName,
}

/// The records of an mDNS response (answers, authority and additional), or none for a query.
/// Questions are skipped; records of other classes and types are kept as [`Data::Other`].
pub fn parse_response(msg: &[u8]) -> Result<Vec<Record>, ParseError> {
    let word = |at: usize| -> Result<u16, ParseError> {
        let b = msg.get(at..at + 2).ok_or(ParseError::Truncated)?;
        Ok(u16::from_be_bytes([b[0], b[1]]))
    };
    let flags = word(2)?;
    // Only responses (QR) with a standard opcode and no error (RFC 6762 §18).
    if flags & 0x8000 == 0 || flags & 0x7800 != 0 || flags & 0x000f != 0 {
        return Ok(Vec::new());
    }
    let questions = word(4)?;
    let records = usize::from(word(6)?) + usize::from(word(8)?) + usize::from(word(10)?);
    let mut at = 12;
    for _ in 0..questions {
        at = read_name(msg, at)?.1 + 4;
    }
    let mut out = Vec::new();
    for _ in 0..records {
        let (name, next) = read_name(msg, at)?;
        let (rtype, class) = (word(next)?, word(next + 2)?);
        let ttl = u32::from(word(next + 4)?) << 16 | u32::from(word(next + 6)?);
        let len = usize::from(word(next + 8)?);
        let start = next + 10;
        let rdata = msg.get(start..start + len).ok_or(ParseError::Truncated)?;
        let data = match (rtype, class & !CACHE_FLUSH) {
            (TYPE_A, CLASS_IN) if len == 4 => Data::A(Ipv4Addr::new(rdata[0], rdata[1], rdata[2], rdata[3])),
            (TYPE_PTR, CLASS_IN) => Data::Ptr(read_name(msg, start)?.0),
            _ => Data::Other,
        };
        out.push(Record {
            name,
            flush: class & CACHE_FLUSH != 0,
            ttl,
            data,
        });
        at = start + len;
    }
    Ok(out)
}

/// The name at `at` (following compression pointers, each to before every place read so far, so
/// no loop) and where the data after it starts.
fn read_name(msg: &[u8], mut at: usize) -> Result<(String, usize), ParseError> {
    let mut labels: Vec<String> = Vec::new();
    let mut end = None;
    let mut total = 0;
    let mut floor = at;
    loop {
        let len = *msg.get(at).ok_or(ParseError::Truncated)?;
        match len {
            0 => {
                end.get_or_insert(at + 1);
                break;
            }
            l if l & 0xc0 == 0xc0 => {
                let low = *msg.get(at + 1).ok_or(ParseError::Truncated)?;
                let target = usize::from(l & 0x3f) << 8 | usize::from(low);
                end.get_or_insert(at + 2);
                if target >= floor {
                    return Err(ParseError::BadName);
                }
                (at, floor) = (target, target);
            }
            l if l > 63 => return Err(ParseError::BadName),
            l => {
                let label = msg
                    .get(at + 1..at + 1 + usize::from(l))
                    .ok_or(ParseError::Truncated)?;
                total += label.len() + 1;
                if total > 255 {
                    return Err(ParseError::BadName);
                }
                labels.push(String::from_utf8_lossy(label).to_ascii_lowercase());
                at += 1 + usize::from(l);
            }
        }
    }
    Ok((labels.join("."), end.unwrap_or(at + 1)))
}

/// A query (id 0, as mDNS sends them) asking each `(name, type)` with a multicast answer (QM).
fn query(questions: &[(String, u16)]) -> Vec<u8> {
    let mut m = vec![0, 0, 0, 0];
    m.extend((questions.len() as u16).to_be_bytes());
    m.extend([0; 6]);
    for (name, rtype) in questions {
        for label in name.split('.').filter(|l| !l.is_empty()) {
            let l = &label.as_bytes()[..label.len().min(63)];
            m.push(l.len() as u8);
            m.extend(l);
        }
        m.push(0);
        m.extend(rtype.to_be_bytes());
        m.extend(CLASS_IN.to_be_bytes());
    }
    m
}

/// A query for the A record of each host (`<host>.local`).
pub fn host_query(hosts: &[String]) -> Vec<u8> {
    let q: Vec<(String, u16)> = hosts.iter().map(|h| (format!("{h}.local"), TYPE_A)).collect();
    query(&q)
}

/// A query for the instances of each service type (PTR), or with [`SERVICES`] for the types.
pub fn browse_query(types: &[String]) -> Vec<u8> {
    let q: Vec<(String, u16)> = types.iter().map(|t| (t.clone(), TYPE_PTR)).collect();
    query(&q)
}

/// An IPv4 subnet of the uplink: address and netmask.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Subnet {
    pub addr: Ipv4Addr,
    pub mask: Ipv4Addr,
}

impl Subnet {
    pub fn contains(&self, a: Ipv4Addr) -> bool {
        let m = u32::from(self.mask);
        u32::from(a) & m == u32::from(self.addr) & m
    }
}

/// What changed in the table, for the log.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum Event {
    Added {
        host: String,
        addr: Ipv4Addr,
    },
    Removed {
        host: String,
        addr: Ipv4Addr,
        why: Gone,
    },
    /// `second` announced `host` with other addresses than `first`, which keeps it.
    Conflict {
        host: String,
        first: Ipv4Addr,
        second: Ipv4Addr,
        addrs: Vec<Ipv4Addr>,
    },
    /// A `.local` name that is not a valid DNS label, or an address off the uplink's subnets.
    Skipped {
        name: String,
        why: &'static str,
    },
}

#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Gone {
    Goodbye,
    Expired,
    Flushed,
}

#[derive(Clone, Debug)]
struct Held {
    learned: Instant,
    ttl: Duration,
    /// Refresh queries sent since it was learned (at 80 % and 90 %).
    asked: u8,
}

impl Held {
    fn expires(&self) -> Instant {
        self.learned + self.ttl
    }

    fn next_ask(&self) -> Option<Instant> {
        let pct = match self.asked {
            0 => 80,
            1 => 90,
            _ => return None,
        };
        Some(self.learned + self.ttl * pct / 100)
    }
}

#[derive(Clone, Debug)]
struct Host {
    /// Who announced it first (the sender's address).
    announcer: Ipv4Addr,
    addrs: BTreeMap<Ipv4Addr, Held>,
}

/// The hosts heard on one uplink.
#[derive(Debug, Default)]
pub struct Hosts {
    subnets: Vec<Subnet>,
    hosts: BTreeMap<String, Host>,
    /// Names and conflicts already reported, so that each is said once.
    said: BTreeSet<String>,
}

/// What one message taught: the changes, and service types to browse.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Learned {
    pub events: Vec<Event>,
    pub service_types: Vec<String>,
}

impl Hosts {
    pub fn new(subnets: Vec<Subnet>) -> Self {
        Self {
            subnets,
            ..Self::default()
        }
    }

    fn on_lan(&self, a: Ipv4Addr) -> bool {
        self.subnets.iter().any(|s| s.contains(a))
    }

    /// Takes in a response from `from`.
    pub fn learn(&mut self, from: Ipv4Addr, records: &[Record], now: Instant) -> Learned {
        let mut out = Learned::default();
        if !self.on_lan(from) {
            return out;
        }
        let mut by_host: BTreeMap<String, Vec<(Ipv4Addr, u32, bool)>> = BTreeMap::new();
        for r in records {
            match &r.data {
                // A service type to browse (not one being withdrawn: a goodbye lists them too).
                Data::Ptr(t) if r.name == SERVICES && r.ttl > 0 && out.service_types.len() < MAX_TYPES => {
                    out.service_types.push(t.clone());
                }
                // Names arrive lowercased (`read_name`), as st8s publishes them.
                Data::A(a) => match r.name.strip_suffix(".local").filter(|h| super::valid_label(h)) {
                    Some(h) if self.on_lan(*a) => by_host
                        .entry(h.to_owned())
                        .or_default()
                        .push((*a, r.ttl, r.flush)),
                    Some(_) => self.skip(
                        &mut out.events,
                        &format!("{}={a}", r.name),
                        "address off the uplink's subnets",
                    ),
                    None => self.skip(
                        &mut out.events,
                        &r.name,
                        "not a single valid DNS label under .local",
                    ),
                },
                _ => {}
            }
        }
        for (host, records) in by_host {
            self.take_host(from, host, &records, now, &mut out.events);
        }
        out
    }

    fn skip(&mut self, events: &mut Vec<Event>, name: &str, why: &'static str) {
        if self.said.insert(format!("skip {name}")) {
            events.push(Event::Skipped {
                name: name.to_owned(),
                why,
            });
        }
    }

    fn take_host(
        &mut self,
        from: Ipv4Addr,
        host: String,
        records: &[(Ipv4Addr, u32, bool)],
        now: Instant,
        events: &mut Vec<Event>,
    ) {
        if !self.hosts.contains_key(&host) && self.hosts.len() >= MAX_HOSTS {
            return;
        }
        let h = self.hosts.entry(host.clone()).or_insert_with(|| Host {
            announcer: from,
            addrs: BTreeMap::new(),
        });
        if h.addrs.is_empty() {
            h.announcer = from;
        }
        let announced: BTreeSet<Ipv4Addr> = records.iter().map(|r| r.0).collect();
        if h.announcer != from && !announced.iter().all(|a| h.addrs.contains_key(a)) {
            if self.said.insert(format!("conflict {host} {from}")) {
                events.push(Event::Conflict {
                    host,
                    first: h.announcer,
                    second: from,
                    addrs: announced.into_iter().collect(),
                });
            }
            return;
        }
        if records.iter().any(|r| r.2) {
            // Cache flush: what this sender no longer announces, learned over a second ago, goes.
            let stale: Vec<Ipv4Addr> = h
                .addrs
                .iter()
                .filter(|(a, held)| {
                    !announced.contains(a) && now.duration_since(held.learned) > Duration::from_secs(1)
                })
                .map(|(a, _)| *a)
                .collect();
            for addr in stale {
                h.addrs.remove(&addr);
                events.push(Event::Removed {
                    host: host.clone(),
                    addr,
                    why: Gone::Flushed,
                });
            }
        }
        for &(addr, ttl, _) in records {
            if ttl == 0 {
                if h.addrs.remove(&addr).is_some() {
                    events.push(Event::Removed {
                        host: host.clone(),
                        addr,
                        why: Gone::Goodbye,
                    });
                }
                continue;
            }
            let held = Held {
                learned: now,
                ttl: Duration::from_secs(u64::from(ttl)),
                asked: 0,
            };
            if h.addrs.insert(addr, held).is_none() {
                if h.addrs.len() > MAX_ADDRS {
                    h.addrs.remove(&addr);
                    continue;
                }
                events.push(Event::Added {
                    host: host.clone(),
                    addr,
                });
            }
        }
        if h.addrs.is_empty() {
            self.hosts.remove(&host);
        }
    }

    /// Removes what has run out by `now`.
    pub fn expire(&mut self, now: Instant) -> Vec<Event> {
        let mut events = Vec::new();
        for (host, h) in &mut self.hosts {
            h.addrs.retain(|addr, held| {
                let keep = held.expires() > now;
                if !keep {
                    events.push(Event::Removed {
                        host: host.clone(),
                        addr: *addr,
                        why: Gone::Expired,
                    });
                }
                keep
            });
        }
        self.hosts.retain(|_, h| !h.addrs.is_empty());
        events
    }

    /// The hosts to ask for again now (each record at 80 % and at 90 % of its TTL).
    pub fn due(&mut self, now: Instant) -> Vec<String> {
        let mut out = Vec::new();
        for (host, h) in &mut self.hosts {
            let mut due = false;
            for held in h.addrs.values_mut() {
                while held.next_ask().is_some_and(|t| t <= now) {
                    held.asked += 1;
                    due = true;
                }
            }
            if due {
                out.push(host.clone());
            }
        }
        out
    }

    /// When [`Self::due`] or [`Self::expire`] next has something to do.
    pub fn next_deadline(&self) -> Option<Instant> {
        let held = self.hosts.values().flat_map(|h| h.addrs.values());
        held.flat_map(|h| [h.next_ask(), Some(h.expires())])
            .flatten()
            .min()
    }

    /// Host -> its addresses, as the Lease annotation carries them.
    pub fn snapshot(&self) -> BTreeMap<String, Vec<Ipv4Addr>> {
        self.hosts
            .iter()
            .map(|(n, h)| (n.clone(), h.addrs.keys().copied().collect()))
            .collect()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An mDNS response as avahi-daemon sends its host announcement: the A record of a unique
    /// name, so with the cache-flush bit, and TTL 120 (AVAHI_DEFAULT_TTL_HOST_NAME in
    /// avahi-common/defs.h, used for A records in avahi-core/entry.c).
    fn response(records: &[(&str, u16, u32, Vec<u8>)]) -> Vec<u8> {
        let mut m = vec![0, 0, 0x84, 0, 0, 0];
        m.extend((records.len() as u16).to_be_bytes());
        m.extend([0; 4]);
        for (name, class, ttl, rdata) in records {
            for l in name.split('.') {
                m.push(l.len() as u8);
                m.extend(l.as_bytes());
            }
            m.push(0);
            let rtype = if rdata.len() == 4 { TYPE_A } else { TYPE_PTR };
            m.extend(rtype.to_be_bytes());
            m.extend(class.to_be_bytes());
            m.extend(ttl.to_be_bytes());
            m.extend((rdata.len() as u16).to_be_bytes());
            m.extend(rdata);
        }
        m
    }

    fn a(name: &str, ttl: u32, ip: [u8; 4]) -> (&str, u16, u32, Vec<u8>) {
        (name, CLASS_IN | CACHE_FLUSH, ttl, ip.to_vec())
    }

    fn lan() -> Hosts {
        Hosts::new(vec![Subnet {
            addr: Ipv4Addr::new(10, 77, 0, 0),
            mask: Ipv4Addr::new(255, 255, 255, 0),
        }])
    }

    const STUCHIP: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 60);

    #[test]
    fn an_announcement_is_learned_asked_again_and_leaves_on_goodbye_or_expiry() {
        let t0 = Instant::now();
        let mut hosts = lan();
        let msg = response(&[a("StuChip.local", 120, [10, 77, 0, 60])]);
        let learned = hosts.learn(STUCHIP, &parse_response(&msg).expect("parses"), t0);
        assert_eq!(
            learned.events,
            [Event::Added {
                host: "stuchip".into(),
                addr: STUCHIP
            }]
        );
        assert_eq!(hosts.snapshot()["stuchip"], [STUCHIP]);
        assert_eq!(hosts.next_deadline(), Some(t0 + Duration::from_secs(96)));
        assert!(hosts.due(t0 + Duration::from_secs(95)).is_empty());
        assert_eq!(hosts.due(t0 + Duration::from_secs(96)), ["stuchip"]);
        assert!(
            hosts.due(t0 + Duration::from_secs(97)).is_empty(),
            "asked once at 80 %"
        );
        assert_eq!(
            hosts.due(t0 + Duration::from_secs(108)),
            ["stuchip"],
            "and at 90 %"
        );
        assert!(hosts.expire(t0 + Duration::from_secs(119)).is_empty());
        // An answer to the refresh renews it.
        let t1 = t0 + Duration::from_secs(110);
        hosts.learn(STUCHIP, &parse_response(&msg).expect("parses"), t1);
        assert!(hosts.expire(t0 + Duration::from_secs(121)).is_empty());
        let gone = hosts.expire(t1 + Duration::from_secs(120));
        assert_eq!(
            gone,
            [Event::Removed {
                host: "stuchip".into(),
                addr: STUCHIP,
                why: Gone::Expired
            }]
        );
        assert!(hosts.snapshot().is_empty());
        // A goodbye (TTL 0) removes it at once.
        hosts.learn(STUCHIP, &parse_response(&msg).expect("parses"), t1);
        let bye = response(&[a("stuchip.local", 0, [10, 77, 0, 60])]);
        let learned = hosts.learn(STUCHIP, &parse_response(&bye).expect("parses"), t1);
        assert_eq!(learned.events.len(), 1);
        assert!(hosts.snapshot().is_empty());
    }

    #[test]
    fn pod_addresses_bad_labels_and_conflicts_are_not_published() {
        let t0 = Instant::now();
        let mut hosts = lan();
        // A responder in a pod announces its pod address; the node sends it.
        let pod = response(&[a("jellyfin.local", 120, [10, 42, 1, 7])]);
        let l = hosts.learn(
            Ipv4Addr::new(10, 77, 0, 11),
            &parse_response(&pod).expect("p"),
            t0,
        );
        assert!(matches!(&l.events[..], [Event::Skipped { .. }]), "{l:?}");
        let odd = response(&[
            a("a.b.local", 120, [10, 77, 0, 5]),
            a("bad_name.local", 120, [10, 77, 0, 6]),
        ]);
        let l = hosts.learn(Ipv4Addr::new(10, 77, 0, 5), &parse_response(&odd).expect("p"), t0);
        assert_eq!(l.events.len(), 2, "{l:?}");
        let again = hosts.learn(Ipv4Addr::new(10, 77, 0, 5), &parse_response(&odd).expect("p"), t0);
        assert!(again.events.is_empty(), "each said once");
        // From off the link.
        let far = response(&[a("far.local", 120, [10, 77, 0, 9])]);
        assert!(
            hosts
                .learn(Ipv4Addr::new(192, 0, 2, 1), &parse_response(&far).expect("p"), t0)
                .events
                .is_empty()
        );
        assert!(hosts.snapshot().is_empty());

        // Two senders claim one name with different addresses: the first keeps it.
        let first = response(&[a("printer.local", 120, [10, 77, 0, 50])]);
        hosts.learn(
            Ipv4Addr::new(10, 77, 0, 50),
            &parse_response(&first).expect("p"),
            t0,
        );
        let second = response(&[a("printer.local", 120, [10, 77, 0, 51])]);
        let l = hosts.learn(
            Ipv4Addr::new(10, 77, 0, 51),
            &parse_response(&second).expect("p"),
            t0,
        );
        assert_eq!(
            l.events,
            [Event::Conflict {
                host: "printer".into(),
                first: Ipv4Addr::new(10, 77, 0, 50),
                second: Ipv4Addr::new(10, 77, 0, 51),
                addrs: vec![Ipv4Addr::new(10, 77, 0, 51)]
            }]
        );
        assert_eq!(hosts.snapshot()["printer"], [Ipv4Addr::new(10, 77, 0, 50)]);
    }

    #[test]
    fn a_cache_flush_replaces_old_addresses_and_browsing_finds_service_types() {
        let t0 = Instant::now();
        let mut hosts = lan();
        let old = response(&[a("nas.local", 120, [10, 77, 0, 70])]);
        hosts.learn(
            Ipv4Addr::new(10, 77, 0, 70),
            &parse_response(&old).expect("p"),
            t0,
        );
        let moved = response(&[a("nas.local", 120, [10, 77, 0, 71])]);
        let t1 = t0 + Duration::from_secs(5);
        hosts.learn(
            Ipv4Addr::new(10, 77, 0, 70),
            &parse_response(&moved).expect("p"),
            t1,
        );
        assert_eq!(hosts.snapshot()["nas"], [Ipv4Addr::new(10, 77, 0, 71)]);

        let mut ptr = Vec::new();
        for l in ["_http", "_tcp", "local"] {
            ptr.push(l.len() as u8);
            ptr.extend(l.as_bytes());
        }
        ptr.push(0);
        let types = response(&[(SERVICES, CLASS_IN, 4500, ptr)]);
        let l = hosts.learn(
            Ipv4Addr::new(10, 77, 0, 70),
            &parse_response(&types).expect("p"),
            t1,
        );
        assert_eq!(l.service_types, ["_http._tcp.local"]);
        let mut withdrawn = parse_response(&types).expect("p");
        withdrawn[0].ttl = 0;
        let gone = hosts.learn(Ipv4Addr::new(10, 77, 0, 70), &withdrawn, t1);
        assert!(gone.service_types.is_empty(), "a goodbye is not browsed");
        let q = browse_query(&l.service_types);
        assert_eq!(&q[4..6], &[0, 1], "one question");
        assert!(q.ends_with(&[0, 0, 12, 0, 1]), "PTR IN, multicast answer");
    }

    #[test]
    fn malformed_messages_are_refused_without_panicking() {
        let ok = response(&[a("x.local", 120, [10, 77, 0, 1])]);
        for cut in 0..ok.len() {
            assert!(parse_response(&ok[..cut]).is_err(), "cut at {cut}");
        }
        // A name pointing at itself, and two pointers that would take turns: a label at 12
        // whose pointer at 14 goes back into the label.
        for name in [vec![0xc0, 12], vec![1, 0xc0, 0xc0, 13]] {
            let mut looped = vec![0, 0, 0x84, 0, 0, 0, 0, 1, 0, 0, 0, 0];
            looped.extend(name);
            looped.extend([0, 1, 0, 1, 0, 0, 0, 120, 0, 4, 1, 2, 3, 4]);
            assert_eq!(parse_response(&looped), Err(ParseError::BadName));
        }
        // A query is not a response.
        let mut q = host_query(&["x".into()]);
        assert!(parse_response(&q).expect("parses").is_empty());
        q[2] = 0x84;
        assert_eq!(parse_response(&q), Ok(Vec::new()), "a response without records");
    }
}
