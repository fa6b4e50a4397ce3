//! `st8s dns`: LAN-first names. Turns the cluster's routes into an RFC 1035 zone that CoreDNS
//! serves with its `file` plugin: every exposed hostname answers with the InternalIPs of the
//! nodes that can serve it, nodes get `<node>.<zone>.<domain>` names, and WAN-only services never
//! get a LAN answer.
//!
//! Pure: objects in, zone text out. The sources of hostnames:
//! - Ingress (`networking.k8s.io/v1`): `spec.rules[].host`;
//! - Gateway API HTTPRoute: `spec.hostnames[]`;
//! - Traefik IngressRoute: ``Host(`a`, `b`)`` matchers in `spec.routes[].match`;
//! - Services annotated `st8s.io/hostname: "a.example.org,b.example.org"`.
//!
//! Exposure, from the annotation `st8s.io/exposure` on the same object: `both` (default), `lan`,
//! `wan` (no LAN record). When objects disagree about one hostname, the most restrictive for the
//! LAN wins (`wan` over `lan` over `both`) and a warning names both objects.
//!
//! Answer policy, from the annotation `st8s.io/answer`: `nodes` (default) answers a name with
//! every serving node, since st8s on any node steers to a backend wherever it runs; `backends`
//! answers only with the serving nodes that run a Ready backend (a pod holding a hostPort) on
//! one of the name's ports (80/tcp and 443/tcp for Ingress, HTTPRoute and IngressRoute; the
//! Service's own ports for an annotated Service), and with every serving node when none does.
//! When objects disagree, `backends` wins and a warning names both.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    net::{Ipv4Addr, Ipv6Addr},
};

use k8s_openapi::{
    api::coordination::v1::Lease,
    jiff::{SignedDuration, Timestamp},
};

pub use self::objects::Objects;
use crate::sources::k8s::{internal_ip as node_internal_ip, internal_ip6, node_ready};

pub mod mdns;
pub mod objects;
pub mod watch;

pub const EXPOSURE_ANNOTATION: &str = "st8s.io/exposure";
pub const HOSTNAME_ANNOTATION: &str = "st8s.io/hostname";
pub const ANSWER_ANNOTATION: &str = "st8s.io/answer";

/// A port a client connects to on a node: number and protocol (`TCP`, `UDP`, `SCTP`), as a
/// pod's hostPort spells it.
pub type NamePort = (i32, String);
/// Each agent renews the Lease `st8s-agent-<node>` (coordination.k8s.io/v1) while its dataplane
/// is programmed from a synced view of the cluster; a node whose Lease has run out leaves the
/// answers.
pub const LEASE_PREFIX: &str = "st8s-agent-";

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Exposure {
    Both,
    Lan,
    Wan,
}

impl Exposure {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "both" => Some(Exposure::Both),
            "lan" => Some(Exposure::Lan),
            "wan" => Some(Exposure::Wan),
            _ => None,
        }
    }
}

#[derive(Clone, Debug)]
pub struct DnsConfig {
    /// Zones to render, e.g. `home.example.org`.
    pub domains: Vec<String>,
    /// Node label that names a node's zone.
    pub zone_label: String,
    pub ttl: u32,
    /// NS target of every zone (out of zone by default, so a zone is valid with no nodes).
    pub ns: String,
    /// A node answers for services only while its agent's Lease is fresh (always so on a
    /// cluster; offline, only when the file holds the Leases).
    pub agent_leases: bool,
    /// Service names get AAAA records too (the serving nodes' IPv6 InternalIPs). Off by default:
    /// st8s steers IPv4 only, and a dual-stack client prefers IPv6 (see the README).
    pub service_aaaa: bool,
    /// Zones (node `zone_label` values) whose agents' mDNS hosts are answered as
    /// `<host>.<zone>.<domain>` (opt-in per zone).
    pub mdns_zones: Vec<String>,
}

/// Which serving nodes a name lists (see the module documentation).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, PartialOrd, Ord)]
pub enum Answer {
    #[default]
    Nodes,
    Backends,
}

impl Answer {
    fn parse(s: &str) -> Option<Self> {
        match s {
            "nodes" => Some(Answer::Nodes),
            "backends" => Some(Answer::Backends),
            _ => None,
        }
    }
}

/// One hostname to answer, and who asked for it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Exposed {
    pub exposure: Exposure,
    pub answer: Answer,
    /// The ports of the name, from every object that names it.
    pub ports: BTreeSet<NamePort>,
    /// `Kind namespace/name` of every object that names the hostname.
    pub sources: Vec<String>,
}

/// What the renderer found wrong; each names the object.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DnsWarning {
    #[error("{object}: hostname {host:?} is outside the configured domains; skipped")]
    OutsideDomains { object: String, host: String },
    #[error("{object}: {host:?} is not a valid hostname; skipped")]
    InvalidHostname { object: String, host: String },
    #[error("{object}: annotation {EXPOSURE_ANNOTATION}={value:?} is not both, lan or wan; skipped")]
    BadExposure { object: String, value: String },
    #[error("{host}: {first} says {first_exposure:?} but {second} says {second_exposure:?}; {winner:?} wins")]
    Conflict {
        host: String,
        first: String,
        first_exposure: Exposure,
        second: String,
        second_exposure: Exposure,
        winner: Exposure,
    },
    #[error(
        "{object}: annotation {ANSWER_ANNOTATION}={value:?} is not nodes or backends; answering with every node"
    )]
    BadAnswer { object: String, value: String },
    #[error(
        "node {node}: annotation {} on its agent's Lease is not a JSON map of host to IPv4 addresses ({error}); skipped",
        mdns::HOSTS_ANNOTATION
    )]
    MdnsBadAnnotation { node: String, error: String },
    #[error("node {node}: mDNS host {host:?} is not a valid DNS label; skipped")]
    MdnsInvalidHost { node: String, host: String },
    #[error("mDNS host {name} is also {by}, which keeps the name")]
    MdnsShadowed { name: String, by: String },
    #[error(
        "{host}: {first} answers with {first_answer:?} but {second} with {second_answer:?}; {winner:?} wins"
    )]
    AnswerConflict {
        host: String,
        first: String,
        first_answer: Answer,
        second: String,
        second_answer: Answer,
        winner: Answer,
    },
}

/// A node as the zone needs it.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct ZoneNode {
    pub name: String,
    pub addr: Ipv4Addr,
    /// Its IPv6 InternalIP, on a dual-stack node.
    pub addr6: Option<Ipv6Addr>,
    pub zone: Option<String>,
    /// Ready, and its agent ready: it answers for services.
    pub serving: bool,
}

/// Everything the zones are rendered from.
#[derive(Clone, Debug, Default)]
pub struct DnsInput {
    pub hosts: BTreeMap<String, Exposed>,
    pub nodes: Vec<ZoneNode>,
    pub warnings: Vec<DnsWarning>,
    /// The ports each node runs a Ready backend on (node name -> ports).
    pub backends: BTreeMap<String, BTreeSet<NamePort>>,
    /// The mDNS hosts of opted-in zones: `<host>.<zone>` -> addresses (the union of what the
    /// zone's agents with a fresh Lease hear).
    pub mdns: BTreeMap<String, BTreeSet<Ipv4Addr>>,
    /// When the first agent Lease that is fresh now runs out: the zones must be rendered again
    /// then, even if no object changes.
    pub next_expiry: Option<Timestamp>,
}

/// When an agent's Lease runs out: `(node, renewTime + leaseDurationSeconds)`.
fn agent_lease(lease: &Lease) -> Option<(String, Timestamp)> {
    let from_name = lease.metadata.name.as_deref()?.strip_prefix(LEASE_PREFIX)?;
    let spec = lease.spec.as_ref()?;
    let node = spec
        .holder_identity
        .clone()
        .unwrap_or_else(|| from_name.to_owned());
    let renewed = spec.renew_time.as_ref()?.0;
    let secs = i64::from(spec.lease_duration_seconds?.max(0));
    let expiry = renewed.checked_add(SignedDuration::from_secs(secs)).ok()?;
    Some((node, expiry))
}

/// The hostnames in a Traefik rule: every ``Host(`a`, `b`)`` (also `Host("a")`).
pub fn traefik_hosts(rule: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut rest = rule;
    while let Some(i) = rest.find("Host(") {
        // `HostRegexp(` and `HostSNI(` are other matchers.
        let before = rest[..i].chars().last();
        rest = &rest[i + 5..];
        if before.is_some_and(|c| c.is_ascii_alphanumeric()) {
            continue;
        }
        let Some(end) = rest.find(')') else { break };
        for arg in rest[..end].split(',') {
            let h = arg.trim().trim_matches(|c| c == '`' || c == '"' || c == '\'');
            if !h.is_empty() {
                out.push(h.to_ascii_lowercase());
            }
        }
        rest = &rest[end..];
    }
    out
}

/// RFC 1123 hostname, with an optional leading `*.` wildcard label.
pub fn valid_hostname(h: &str) -> bool {
    let h = h.strip_prefix("*.").unwrap_or(h);
    !h.is_empty() && h.len() <= 253 && h.split('.').all(valid_label)
}

/// One label of a hostname as st8s writes it (RFC 1123, lowercase): letters, digits and inner
/// hyphens, at most 63.
pub fn valid_label(l: &str) -> bool {
    !l.is_empty()
        && l.len() <= 63
        && l.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !l.starts_with('-')
        && !l.ends_with('-')
}

/// [`collect`] over YAML documents (`kubectl get ... -o yaml`, lists or several documents).
pub fn collect_yaml(text: &str, cfg: &DnsConfig, now: Timestamp) -> Result<DnsInput, serde_yaml::Error> {
    Ok(collect(&objects::from_yaml(text)?, cfg, now))
}

/// Hostnames and nodes from the objects, judging agent Leases at `now`.
pub fn collect(objects: &Objects, cfg: &DnsConfig, now: Timestamp) -> DnsInput {
    let mut input = DnsInput::default();
    let mut leases: BTreeMap<String, Timestamp> = BTreeMap::new();
    for (node, expiry) in objects.leases.iter().filter_map(agent_lease) {
        let e = leases.entry(node).or_insert(expiry);
        *e = (*e).max(expiry);
    }
    input.next_expiry = leases.values().copied().filter(|e| *e > now).min();
    for node in &objects.nodes {
        let Some(addr) = node_internal_ip(node) else {
            continue;
        };
        let name = node.metadata.name.clone().unwrap_or_default();
        let zone = node
            .metadata
            .labels
            .as_ref()
            .and_then(|l| l.get(&cfg.zone_label))
            .cloned();
        let agent_ok = !cfg.agent_leases || leases.get(&name).is_some_and(|expiry| *expiry > now);
        input.nodes.push(ZoneNode {
            name,
            addr,
            addr6: internal_ip6(node),
            zone,
            serving: node_ready(node) && agent_ok,
        });
    }
    input.nodes.sort_by(|a, b| a.name.cmp(&b.name));
    if !cfg.mdns_zones.is_empty() {
        collect_mdns(objects, cfg, now, &mut input);
    }
    for pod in objects.pods.iter().filter(|p| p.ready && !p.terminating) {
        if let Some(node) = &pod.node {
            let ports = pod.host_ports.iter();
            input
                .backends
                .entry(node.clone())
                .or_default()
                .extend(ports.map(|h| (h.host_port, h.protocol.to_ascii_uppercase())));
        }
    }
    let mut claims: Vec<(String, Exposed)> = Vec::new();
    for route in objects.routes.iter().filter(|r| !r.hosts.is_empty()) {
        let object = route.object.as_str();
        let exposure = match route.exposure.as_deref() {
            None => Exposure::Both,
            Some(a) => match Exposure::parse(a) {
                Some(e) => e,
                None => {
                    input.warnings.push(DnsWarning::BadExposure {
                        object: object.to_owned(),
                        value: a.to_owned(),
                    });
                    continue;
                }
            },
        };
        let answer = match route.answer.as_deref().map(|a| (a, Answer::parse(a))) {
            None => Answer::Nodes,
            Some((_, Some(a))) => a,
            Some((value, None)) => {
                input.warnings.push(DnsWarning::BadAnswer {
                    object: object.to_owned(),
                    value: value.to_owned(),
                });
                Answer::Nodes
            }
        };
        for host in &route.hosts {
            let host = host.trim_end_matches('.').to_ascii_lowercase();
            if !valid_hostname(&host) {
                input.warnings.push(DnsWarning::InvalidHostname {
                    object: object.to_owned(),
                    host,
                });
            } else if zone_of(&host, &cfg.domains).is_none() {
                input.warnings.push(DnsWarning::OutsideDomains {
                    object: object.to_owned(),
                    host,
                });
            } else {
                let claim = Exposed {
                    exposure,
                    answer,
                    ports: route.ports.iter().cloned().collect(),
                    sources: vec![object.to_owned()],
                };
                claims.push((host, claim));
            }
        }
    }
    for (host, claim) in claims {
        merge_claim(&mut input, host, claim);
    }
    input
}

/// The mDNS hosts that the agents of opted-in zones publish on their Leases (fresh Leases only:
/// an agent that is gone no longer vouches for what it heard).
fn collect_mdns(objects: &Objects, cfg: &DnsConfig, now: Timestamp, input: &mut DnsInput) {
    for lease in &objects.leases {
        let Some((node, expiry)) = agent_lease(lease) else {
            continue;
        };
        let zone = input
            .nodes
            .iter()
            .find(|n| n.name == node)
            .and_then(|n| n.zone.clone());
        let Some(zone) = zone.filter(|z| cfg.mdns_zones.contains(z)) else {
            continue;
        };
        let annotations = lease.metadata.annotations.as_ref();
        let Some(text) = annotations.and_then(|a| a.get(mdns::HOSTS_ANNOTATION)) else {
            continue;
        };
        if expiry <= now {
            continue;
        }
        let heard: BTreeMap<String, Vec<Ipv4Addr>> = match serde_json::from_str(text) {
            Ok(h) => h,
            Err(e) => {
                input.warnings.push(DnsWarning::MdnsBadAnnotation {
                    node,
                    error: e.to_string(),
                });
                continue;
            }
        };
        for (host, addrs) in heard {
            if !valid_label(&host) {
                input.warnings.push(DnsWarning::MdnsInvalidHost {
                    node: node.clone(),
                    host,
                });
                continue;
            }
            let name = format!("{host}.{zone}");
            input.mdns.entry(name).or_default().extend(addrs);
        }
    }
    // A node's own name, or a name st8s publishes for a service, keeps it.
    let names: Vec<String> = input.mdns.keys().cloned().collect();
    for name in names {
        let node = input
            .nodes
            .iter()
            .find(|n| n.zone.as_ref().is_some_and(|z| format!("{}.{z}", n.name) == name));
        let by = match node {
            Some(n) => Some(format!("node {}", n.name)),
            None => cfg.domains.iter().find_map(|d| {
                let full = format!("{name}.{d}");
                let e = input.hosts.get(&full)?;
                Some(format!("{full} ({})", e.sources.join(", ")))
            }),
        };
        if let Some(by) = by {
            input.mdns.remove(&name);
            input.warnings.push(DnsWarning::MdnsShadowed { name, by });
        }
    }
}

/// Adds one object's claim on a hostname: the more restrictive exposure and answer win, with a
/// warning naming the first object that said otherwise.
fn merge_claim(input: &mut DnsInput, host: String, claim: Exposed) {
    let Exposed {
        exposure,
        answer,
        ports,
        sources,
    } = claim;
    let object = sources[0].as_str();
    let Some(e) = input.hosts.get_mut(&host) else {
        input.hosts.insert(
            host,
            Exposed {
                exposure,
                answer,
                ports,
                sources,
            },
        );
        return;
    };
    if e.answer != answer {
        let winner = e.answer.max(answer);
        input.warnings.push(DnsWarning::AnswerConflict {
            host: host.clone(),
            first: e.sources[0].clone(),
            first_answer: e.answer,
            second: object.to_owned(),
            second_answer: answer,
            winner,
        });
        e.answer = winner;
    }
    e.ports.extend(ports);
    if e.exposure != exposure {
        let winner = e.exposure.max(exposure);
        input.warnings.push(DnsWarning::Conflict {
            host: host.clone(),
            first: e.sources[0].clone(),
            first_exposure: e.exposure,
            second: object.to_owned(),
            second_exposure: exposure,
            winner,
        });
        e.exposure = winner;
    }
    if !e.sources.iter().any(|s| s == object) {
        e.sources.push(object.to_owned());
    }
}

impl DnsInput {
    /// The nodes a name answers with: every serving node, or with `backends` those that run a
    /// backend on one of its ports (every serving node when none does).
    pub fn answering(&self, e: &Exposed) -> Vec<&ZoneNode> {
        let serving: Vec<&ZoneNode> = self.nodes.iter().filter(|n| n.serving).collect();
        if e.answer == Answer::Backends {
            let runs_one = |n: &&ZoneNode| {
                self.backends
                    .get(&n.name)
                    .is_some_and(|ports| !ports.is_disjoint(&e.ports))
            };
            let with: Vec<&ZoneNode> = serving.iter().copied().filter(runs_one).collect();
            if !with.is_empty() {
                return with;
            }
        }
        serving
    }
}

/// The comment above a name's records: who names it, and how.
fn claim_comment(e: &Exposed) -> String {
    let answer = match e.answer {
        Answer::Nodes => "",
        Answer::Backends => ", backends",
    };
    format!("; {} ({:?}{answer})", e.sources.join(", "), e.exposure)
}

/// The configured domain a hostname belongs to (the longest match).
pub fn zone_of<'a>(host: &str, domains: &'a [String]) -> Option<&'a str> {
    domains
        .iter()
        .filter(|d| host == d.as_str() || host.ends_with(&format!(".{d}")))
        .max_by_key(|d| d.len())
        .map(String::as_str)
}

/// The records of one zone, without the SOA (which carries the serial): comparing two renders'
/// bodies says whether the serial must move.
pub fn zone_body(input: &DnsInput, domain: &str, cfg: &DnsConfig) -> String {
    let mut b = String::new();
    let _ = writeln!(b, "@ IN NS {}", fqdn(&cfg.ns));
    let rel = |name: &str| -> String {
        if name == domain {
            "@".into()
        } else {
            name.strip_suffix(&format!(".{domain}"))
                .unwrap_or(name)
                .to_owned()
        }
    };
    for (host, e) in &input.hosts {
        if e.exposure == Exposure::Wan || zone_of(host, &cfg.domains) != Some(domain) {
            continue;
        }
        let _ = writeln!(b, "{}", claim_comment(e));
        for line in service_records(&input.answering(e), cfg, &rel(host)) {
            let _ = writeln!(b, "{line}");
        }
    }
    for n in &input.nodes {
        let name = match &n.zone {
            Some(z) => format!("{}.{z}", n.name),
            None => n.name.clone(),
        };
        if valid_hostname(&name) {
            for line in node_records(n, &name) {
                let _ = writeln!(b, "{line}");
            }
        }
    }
    for (name, addrs) in &input.mdns {
        let _ = writeln!(b, "; mDNS {name}");
        for a in addrs {
            let _ = writeln!(b, "{name} IN A {a}");
        }
    }
    b
}

/// A service name's records, owned by `owner`: an A per answering node, and with
/// `service_aaaa` an AAAA per answering node that has an IPv6 address.
fn service_records(nodes: &[&ZoneNode], cfg: &DnsConfig, owner: &str) -> Vec<String> {
    let mut lines: Vec<String> = nodes.iter().map(|n| format!("{owner} IN A {}", n.addr)).collect();
    if cfg.service_aaaa {
        lines.extend(
            nodes
                .iter()
                .filter_map(|n| Some(format!("{owner} IN AAAA {}", n.addr6?))),
        );
    }
    lines
}

/// A node name's records: its IPv4 address, and its IPv6 one when it has one (the node itself
/// answers there, whatever st8s steers).
fn node_records(n: &ZoneNode, owner: &str) -> Vec<String> {
    let mut lines = vec![format!("{owner} IN A {}", n.addr)];
    lines.extend(n.addr6.map(|a| format!("{owner} IN AAAA {a}")));
    lines
}

fn fqdn(name: &str) -> String {
    if name.ends_with('.') {
        name.to_owned()
    } else {
        format!("{name}.")
    }
}

/// The serial in a zone this renderer wrote, if any.
pub fn serial_of(zone: &str) -> Option<u32> {
    zone.lines().find_map(|l| {
        l.split("; serial")
            .next()
            .filter(|_| l.contains("; serial"))?
            .trim()
            .parse()
            .ok()
    })
}

/// The body of a zone this renderer wrote (everything after the SOA).
pub fn body_of(zone: &str) -> Option<&str> {
    zone.split_once(";; records\n").map(|(_, b)| b)
}

/// Renders the zone; `previous` is the last rendered text, whose serial is kept when nothing
/// changed and incremented otherwise.
pub fn render_zone(
    input: &DnsInput,
    domain: &str,
    cfg: &DnsConfig,
    previous: Option<&str>,
) -> (String, bool) {
    with_soa(domain, &zone_body(input, domain, cfg), cfg, previous)
}

/// A zone's text: header, SOA (the serial continued from `previous`, moved only when the body
/// changed) and `body`; and whether it changed.
fn with_soa(origin: &str, body: &str, cfg: &DnsConfig, previous: Option<&str>) -> (String, bool) {
    let old_serial = previous.and_then(serial_of);
    let unchanged = previous.and_then(body_of) == Some(body);
    let serial = match (old_serial, unchanged) {
        (Some(s), true) => s,
        (Some(s), false) => s.wrapping_add(1).max(1),
        (None, _) => 1,
    };
    let mut z = String::new();
    let _ = writeln!(z, "{HEADER}");
    let _ = writeln!(z, "$ORIGIN {}", fqdn(origin));
    let _ = writeln!(z, "$TTL {}", cfg.ttl);
    let _ = writeln!(
        z,
        "@ IN SOA {} hostmaster.{} (\n    {serial} ; serial\n    3600 ; refresh\n    600 ; retry\n    86400 ; expire\n    {} ; negative TTL\n)",
        fqdn(&cfg.ns),
        fqdn(origin),
        cfg.ttl
    );
    let _ = write!(z, ";; records\n{body}");
    (z, !unchanged)
}

/// The first line of every zone st8s dns writes: what it may replace or remove.
pub const HEADER: &str = "; rendered by st8s dns; do not edit";

/// The per-name layout: one zone per name st8s publishes (`lan` and `both` names with at least one
/// serving node; `*.x` goes into the zone `x` as `*`) and one per node name, each holding only its
/// own records. A DNS server that loads every zone of a directory and passes what none of them
/// holds to the next resolver (CoreDNS `auto` then `forward`) thereby answers exactly these names
/// from st8s and every other name of the domain (`wan` names, names st8s does not know, a name
/// whose nodes are all down) as the upstream does. Origin -> zone body (without the SOA).
pub fn name_zone_bodies(input: &DnsInput, cfg: &DnsConfig) -> BTreeMap<String, String> {
    let serving: Vec<Ipv4Addr> = input.nodes.iter().filter(|n| n.serving).map(|n| n.addr).collect();
    let mut records: BTreeMap<String, Vec<String>> = BTreeMap::new();
    if !serving.is_empty() {
        for (host, e) in &input.hosts {
            if e.exposure == Exposure::Wan || zone_of(host, &cfg.domains).is_none() {
                continue;
            }
            let (origin, owner) = match host.strip_prefix("*.") {
                Some(parent) => (parent.to_owned(), "*"),
                None => (host.clone(), "@"),
            };
            let lines = records.entry(origin).or_default();
            lines.push(claim_comment(e));
            lines.extend(service_records(&input.answering(e), cfg, owner));
        }
    }
    for n in &input.nodes {
        let name = match &n.zone {
            Some(z) => format!("{}.{z}", n.name),
            None => n.name.clone(),
        };
        if !valid_hostname(&name) {
            continue;
        }
        for domain in &cfg.domains {
            records
                .entry(format!("{name}.{domain}"))
                .or_default()
                .extend(node_records(n, "@"));
        }
    }
    for (name, addrs) in &input.mdns {
        for domain in &cfg.domains {
            let lines = records.entry(format!("{name}.{domain}")).or_default();
            lines.push(format!("; mDNS {name}"));
            lines.extend(addrs.iter().map(|a| format!("@ IN A {a}")));
        }
    }
    records
        .into_iter()
        .map(|(origin, lines)| {
            let body = format!("@ IN NS {}\n{}\n", fqdn(&cfg.ns), lines.join("\n"));
            (origin, body)
        })
        .collect()
}

/// The per-name zones (see [`name_zone_bodies`]) as text, each continuing the serial of its
/// `previous` text; with whether each changed.
pub fn render_name_zones(
    input: &DnsInput,
    cfg: &DnsConfig,
    previous: &BTreeMap<String, String>,
) -> BTreeMap<String, (String, bool)> {
    name_zone_bodies(input, cfg)
        .into_iter()
        .map(|(origin, body)| {
            let zone = with_soa(&origin, &body, cfg, previous.get(&origin).map(String::as_str));
            (origin, zone)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn cfg() -> DnsConfig {
        DnsConfig {
            domains: vec!["home.example.org".into()],
            zone_label: "st8s.io/zone".into(),
            ttl: 30,
            ns: "localhost".into(),
            agent_leases: true,
            service_aaaa: false,
            mdns_zones: Vec::new(),
        }
    }

    /// The moment the fixtures are judged at.
    fn now() -> Timestamp {
        "2026-11-22T10:00:00Z".parse().expect("timestamp")
    }

    const NODES: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node1, labels: {st8s.io/zone: attic}}
  status:
    addresses: [{type: InternalIP, address: 10.0.0.11}]
    conditions: [{type: Ready, status: "True"}]
- apiVersion: v1
  kind: Node
  metadata: {name: node2}
  status:
    addresses: [{type: InternalIP, address: 10.0.0.12}]
    conditions: [{type: Ready, status: "True"}]
- apiVersion: v1
  kind: Node
  metadata: {name: node3}
  status:
    addresses: [{type: InternalIP, address: 10.0.0.13}]
    conditions: [{type: Ready, status: "False"}]
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: st8s-agent-node1, namespace: st8s-system}
  spec: {holderIdentity: node1, leaseDurationSeconds: 10, renewTime: "2026-11-22T09:59:55.000000Z"}
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: st8s-agent-node2, namespace: st8s-system}
  spec: {holderIdentity: node2, leaseDurationSeconds: 10, renewTime: "2026-11-22T09:59:49.000000Z"}
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: st8s-agent-node3, namespace: st8s-system}
  spec: {holderIdentity: node3, leaseDurationSeconds: 10, renewTime: "2026-11-22T09:59:58.000000Z"}
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: kube-node-lease-node2, namespace: kube-node-lease}
  spec: {holderIdentity: node2, leaseDurationSeconds: 40, renewTime: "2026-11-22T09:59:59.000000Z"}
"#;

    #[test]
    fn traefik_matchers() {
        assert_eq!(traefik_hosts("Host(`a.x.org`) && PathPrefix(`/`)"), ["a.x.org"]);
        assert_eq!(
            traefik_hosts("Host(`a.x.org`, `b.x.org`) || Host(\"c.x.org\")"),
            ["a.x.org", "b.x.org", "c.x.org"]
        );
        assert!(traefik_hosts("HostRegexp(`{sub:[a-z]+}.x.org`)").is_empty());
        assert!(traefik_hosts("HostSNI(`*`)").is_empty());
    }

    #[test]
    fn hostnames() {
        assert!(valid_hostname("jellyfin.home.example.org"));
        assert!(valid_hostname("*.apps.home.example.org"));
        assert!(!valid_hostname("bad_name.home.example.org"));
        assert!(!valid_hostname("-x.home.example.org"));
        assert!(!valid_hostname(""));
        assert_eq!(
            zone_of("a.home.example.org", &cfg().domains),
            Some("home.example.org")
        );
        assert_eq!(zone_of("a.example.org", &cfg().domains), None);
    }

    #[test]
    fn exposure_policy_and_sources() {
        let yaml = NODES.to_owned()
            + r#"
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: jellyfin, namespace: media}
spec: {rules: [{host: jellyfin.home.example.org}, {host: other.example.com}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gotify, namespace: notify, annotations: {st8s.io/exposure: wan}}
spec: {hostnames: [gotify.home.example.org]}
---
apiVersion: traefik.io/v1alpha1
kind: IngressRoute
metadata: {name: ha, namespace: home, annotations: {st8s.io/exposure: lan}}
spec: {routes: [{match: "Host(`ha.home.example.org`)", kind: Rule}]}
---
apiVersion: v1
kind: Service
metadata: {name: gotify-lan, namespace: notify, annotations: {st8s.io/hostname: "gotify.home.example.org, Bad_Host.home.example.org"}}
---
apiVersion: v1
kind: Service
metadata: {name: odd, namespace: x, annotations: {st8s.io/hostname: "odd.home.example.org", st8s.io/exposure: public}}
"#;
        let input = collect_yaml(&yaml, &cfg(), now()).expect("parses");
        assert_eq!(input.hosts["jellyfin.home.example.org"].exposure, Exposure::Both);
        assert_eq!(input.hosts["ha.home.example.org"].exposure, Exposure::Lan);
        let gotify = &input.hosts["gotify.home.example.org"];
        assert_eq!(
            gotify.exposure,
            Exposure::Wan,
            "the more restrictive for the LAN wins"
        );
        let text: Vec<String> = input.warnings.iter().map(|w| w.to_string()).collect();
        let all = text.join("\n");
        assert!(
            all.contains("HTTPRoute notify/gotify") && all.contains("Service notify/gotify-lan"),
            "{all}"
        );
        assert!(
            all.contains("other.example.com") && all.contains("outside"),
            "{all}"
        );
        assert!(all.contains("bad_host"), "{all}");
        assert!(all.contains("Service x/odd") && all.contains("public"), "{all}");
        assert!(!input.hosts.contains_key("odd.home.example.org"));

        let (zone, _) = render_zone(&input, "home.example.org", &cfg(), None);
        assert!(zone.contains("jellyfin IN A 10.0.0.11"), "{zone}");
        assert!(
            !zone.contains("jellyfin IN A 10.0.0.12"),
            "the agent's Lease ran out (another Lease for the node does not count): {zone}"
        );
        assert!(!zone.contains("jellyfin IN A 10.0.0.13"), "NotReady: {zone}");
        assert!(zone.contains("ha IN A 10.0.0.11"));
        assert!(
            !zone.contains("gotify"),
            "a WAN-only name never gets a LAN record: {zone}"
        );
        assert!(zone.contains("node1.attic IN A 10.0.0.11"));
        assert!(zone.contains("node3 IN A 10.0.0.13"), "node names stay");
    }

    #[test]
    fn agent_leases_decide_until_they_run_out() {
        let input = collect_yaml(NODES, &cfg(), now()).expect("parses");
        let serving: Vec<&str> = input
            .nodes
            .iter()
            .filter(|n| n.serving)
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(serving, ["node1"]);
        assert_eq!(
            input.next_expiry,
            Some("2026-11-22T10:00:05Z".parse().expect("timestamp")),
            "node1's Lease runs out first (node3's later, but node3 is NotReady anyway)"
        );
        let later: Timestamp = "2026-11-22T10:00:06Z".parse().expect("timestamp");
        let input = collect_yaml(NODES, &cfg(), later).expect("parses");
        assert!(input.nodes.iter().all(|n| !n.serving), "node1's Lease ran out");
        let offline = DnsConfig {
            agent_leases: false,
            ..cfg()
        };
        let input = collect_yaml(NODES, &offline, later).expect("parses");
        let serving: Vec<&str> = input
            .nodes
            .iter()
            .filter(|n| n.serving)
            .map(|n| n.name.as_str())
            .collect();
        assert_eq!(serving, ["node1", "node2"], "without Leases, Ready alone decides");
    }

    #[test]
    fn serial_moves_only_on_change_and_an_empty_cluster_is_valid() {
        let empty = collect_yaml("", &cfg(), now()).expect("parses");
        let (z1, changed) = render_zone(&empty, "home.example.org", &cfg(), None);
        assert!(changed);
        assert_eq!(serial_of(&z1), Some(1));
        assert!(z1.contains("IN SOA") && z1.contains("IN NS localhost."));
        let (z2, changed) = render_zone(&empty, "home.example.org", &cfg(), Some(&z1));
        assert!(!changed);
        assert_eq!(z1, z2, "nothing changed, nothing moves");
        let nodes = collect_yaml(NODES, &cfg(), now()).expect("parses");
        let (z3, changed) = render_zone(&nodes, "home.example.org", &cfg(), Some(&z2));
        assert!(changed);
        assert_eq!(serial_of(&z3), Some(2));
    }

    #[test]
    fn per_name_zones_hold_only_what_st8s_publishes() {
        let yaml = NODES.to_owned()
            + r#"
---
apiVersion: networking.k8s.io/v1
kind: Ingress
metadata: {name: jellyfin, namespace: media}
spec: {rules: [{host: jellyfin.home.example.org}, {host: "*.apps.home.example.org"}]}
---
apiVersion: gateway.networking.k8s.io/v1
kind: HTTPRoute
metadata: {name: gotify, namespace: notify, annotations: {st8s.io/exposure: wan}}
spec: {hostnames: [gotify.home.example.org]}
"#;
        let input = collect_yaml(&yaml, &cfg(), now()).expect("parses");
        let zones = render_name_zones(&input, &cfg(), &BTreeMap::new());
        let origins: Vec<&str> = zones.keys().map(String::as_str).collect();
        assert_eq!(
            origins,
            [
                "apps.home.example.org",
                "jellyfin.home.example.org",
                "node1.attic.home.example.org",
                "node2.home.example.org",
                "node3.home.example.org"
            ],
            "no zone for the wan name, nor for the domain itself"
        );
        let (jelly, changed) = &zones["jellyfin.home.example.org"];
        assert!(changed);
        assert!(
            jelly.contains("$ORIGIN jellyfin.home.example.org.") && jelly.contains("@ IN A 10.0.0.11"),
            "{jelly}"
        );
        assert!(
            !jelly.contains("10.0.0.12"),
            "node2's agent Lease ran out: {jelly}"
        );
        assert!(zones["apps.home.example.org"].0.contains("* IN A 10.0.0.11"));
        assert!(
            zones["node3.home.example.org"].0.contains("@ IN A 10.0.0.13"),
            "node names stay"
        );
        // The serial continues per zone, and moves only when that zone changes.
        let previous: BTreeMap<String, String> =
            zones.iter().map(|(o, (z, _))| (o.clone(), z.clone())).collect();
        let again = render_name_zones(&input, &cfg(), &previous);
        assert!(again.values().all(|(_, changed)| !changed));
        // No serving node at all: the service names go (upstream answers them), node names stay.
        let later: Timestamp = "2026-11-22T10:00:06Z".parse().expect("timestamp");
        let down = collect_yaml(&yaml, &cfg(), later).expect("parses");
        let zones = render_name_zones(&down, &cfg(), &previous);
        assert!(!zones.contains_key("jellyfin.home.example.org"));
        assert!(zones.contains_key("node1.attic.home.example.org"));
    }

    #[test]
    fn answer_backends_lists_the_nodes_that_run_one_and_every_node_when_none_does() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node1}
  status: {addresses: [{type: InternalIP, address: 10.0.0.11}], conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Node
  metadata: {name: node2}
  status: {addresses: [{type: InternalIP, address: 10.0.0.12}], conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Node
  metadata: {name: node3}
  status: {addresses: [{type: InternalIP, address: 10.0.0.13}], conditions: [{type: Ready, status: "False"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: traefik-a, namespace: ingress}
  spec: {nodeName: node2, containers: [{name: t, ports: [{containerPort: 8443, hostPort: 443}]}]}
  status: {podIP: 10.42.1.5, conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: traefik-b, namespace: ingress}
  spec: {nodeName: node3, containers: [{name: t, ports: [{containerPort: 8443, hostPort: 443}]}]}
  status: {podIP: 10.42.2.5, conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: coredns-a, namespace: dns, deletionTimestamp: "2026-11-22T09:59:00Z"}
  spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 53, hostPort: 53, protocol: UDP}]}]}
  status: {podIP: 10.42.0.7, conditions: [{type: Ready, status: "True"}]}
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: photos, namespace: media, annotations: {st8s.io/answer: backends}}
  spec: {rules: [{host: photos.home.example.org}]}
- apiVersion: v1
  kind: Service
  metadata: {name: dns, namespace: dns, annotations: {st8s.io/hostname: ns.home.example.org, st8s.io/answer: backends}}
  spec: {ports: [{port: 53, protocol: UDP}]}
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: wiki, namespace: docs, annotations: {st8s.io/answer: backends}}
  spec: {rules: [{host: wiki.home.example.org}]}
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: notes, namespace: docs}
  spec: {rules: [{host: notes.home.example.org}]}
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: wiki, namespace: docs, annotations: {st8s.io/answer: all}}
  spec: {hostnames: [wiki.home.example.org, notes.home.example.org]}
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: notes-b, namespace: docs, annotations: {st8s.io/answer: backends}}
  spec: {hostnames: [notes.home.example.org]}
"#;
        let offline = DnsConfig {
            agent_leases: false,
            ..cfg()
        };
        let input = collect_yaml(yaml, &offline, now()).expect("parses");
        let answer = |host: &str| -> Vec<String> {
            input
                .answering(&input.hosts[host])
                .iter()
                .map(|n| n.name.clone())
                .collect()
        };
        assert_eq!(
            answer("photos.home.example.org"),
            ["node2"],
            "node3 runs Traefik too, but is NotReady"
        );
        assert_eq!(
            answer("ns.home.example.org"),
            ["node1", "node2"],
            "the only DNS backend is shutting down: every serving node"
        );
        assert_eq!(answer("notes.home.example.org"), ["node2"], "backends wins");
        assert_eq!(
            answer("wiki.home.example.org"),
            ["node2"],
            "a bad value answers with every node, and backends still wins"
        );
        let all = input
            .warnings
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        assert!(
            all.contains("HTTPRoute docs/wiki") && all.contains("\"all\" is not nodes or backends"),
            "{all}"
        );
        assert!(
            all.contains("Ingress docs/notes answers with Nodes but HTTPRoute docs/notes-b with Backends; Backends wins"),
            "{all}"
        );
        let (zone, _) = render_zone(&input, "home.example.org", &offline, None);
        assert!(zone.contains("photos IN A 10.0.0.12"), "{zone}");
        assert!(!zone.contains("photos IN A 10.0.0.11"), "{zone}");
        assert!(zone.contains("; Ingress media/photos (Both, backends)"), "{zone}");
        let zones = render_name_zones(&input, &offline, &BTreeMap::new());
        let photos = &zones["photos.home.example.org"].0;
        assert!(
            photos.contains("@ IN A 10.0.0.12") && !photos.contains("10.0.0.11"),
            "{photos}"
        );
    }

    #[test]
    fn mdns_hosts_of_opted_in_zones_are_answered_under_the_zone() {
        // node1 (attic) hears stuchip, its own name and a bad label; node2 (no zone) and node3
        // (NotReady, but with a fresh Lease) hear other things.
        let leases = r#"
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: st8s-agent-node1, namespace: st8s-system, annotations: {st8s.io/mdns-hosts: '{"stuchip":["10.0.0.60"],"node1":["10.0.0.99"],"Bad_Host":["10.0.0.61"]}'}}
  spec: {holderIdentity: node1, leaseDurationSeconds: 10, renewTime: "2026-11-22T09:59:55.000000Z"}
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: st8s-agent-node2, namespace: st8s-system, annotations: {st8s.io/mdns-hosts: '{"tv":["10.0.0.62"]}'}}
  spec: {holderIdentity: node2, leaseDurationSeconds: 10, renewTime: "2026-11-22T09:59:55.000000Z"}
- apiVersion: v1
  kind: Node
  metadata: {name: node4, labels: {st8s.io/zone: attic}}
  status: {addresses: [{type: InternalIP, address: 10.0.0.14}], conditions: [{type: Ready, status: "True"}]}
- apiVersion: coordination.k8s.io/v1
  kind: Lease
  metadata: {name: st8s-agent-node4, namespace: st8s-system, annotations: {st8s.io/mdns-hosts: 'not json'}}
  spec: {holderIdentity: node4, leaseDurationSeconds: 10, renewTime: "2026-11-22T09:59:55.000000Z"}
"#;
        let yaml = NODES.replace(
            "- apiVersion: coordination.k8s.io/v1\n  kind: Lease\n  metadata: {name: st8s-agent-node1,",
            "- apiVersion: coordination.k8s.io/v1\n  kind: Lease\n  metadata: {name: old-node1,",
        ) + leases;
        let opted = DnsConfig {
            mdns_zones: vec!["attic".into()],
            ..cfg()
        };
        let input = collect_yaml(&yaml, &opted, now()).expect("parses");
        let names: Vec<&str> = input.mdns.keys().map(String::as_str).collect();
        assert_eq!(
            names,
            ["stuchip.attic"],
            "node2 has no zone; node1's own name stays the node's"
        );
        let all = input
            .warnings
            .iter()
            .map(|w| w.to_string())
            .collect::<Vec<_>>()
            .join("\n");
        for want in [
            "\"Bad_Host\" is not a valid DNS label",
            "node1.attic is also node node1",
            "node4: annotation st8s.io/mdns-hosts",
        ] {
            assert!(all.contains(want), "{want}: {all}");
        }
        let (zone, _) = render_zone(&input, "home.example.org", &opted, None);
        assert!(zone.contains("stuchip.attic IN A 10.0.0.60"), "{zone}");
        assert!(
            zone.contains("node1.attic IN A 10.0.0.11") && !zone.contains("10.0.0.99"),
            "{zone}"
        );
        let zones = render_name_zones(&input, &opted, &BTreeMap::new());
        assert!(
            zones["stuchip.attic.home.example.org"]
                .0
                .contains("@ IN A 10.0.0.60")
        );
        // Not opted in: nothing; the agent's Lease runs out: its hosts go with it.
        let plain = collect_yaml(&yaml, &cfg(), now()).expect("parses");
        assert!(plain.mdns.is_empty());
        let later: Timestamp = "2026-11-22T10:00:06Z".parse().expect("timestamp");
        assert!(
            collect_yaml(&yaml, &opted, later)
                .expect("parses")
                .mdns
                .is_empty()
        );
    }

    #[test]
    fn dual_stack_nodes_get_aaaa_and_service_names_only_when_asked() {
        let yaml = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node1, labels: {st8s.io/zone: attic}}
  status:
    addresses: [{type: InternalIP, address: 10.0.0.11}, {type: InternalIP, address: "fd00::11"}, {type: ExternalIP, address: "2001:db8::11"}]
    conditions: [{type: Ready, status: "True"}]
- apiVersion: v1
  kind: Node
  metadata: {name: node2}
  status:
    addresses: [{type: InternalIP, address: 10.0.0.12}]
    conditions: [{type: Ready, status: "True"}]
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: jellyfin, namespace: media}
  spec: {rules: [{host: jellyfin.home.example.org}]}
"#;
        let offline = DnsConfig {
            agent_leases: false,
            ..cfg()
        };
        let input = collect_yaml(yaml, &offline, now()).expect("parses");
        let (zone, _) = render_zone(&input, "home.example.org", &offline, None);
        assert!(zone.contains("node1.attic IN AAAA fd00::11"), "{zone}");
        assert!(!zone.contains("2001:db8::11"), "InternalIP only: {zone}");
        assert!(
            !zone.contains("jellyfin IN AAAA"),
            "off with --no-service-aaaa: {zone}"
        );
        let aaaa = DnsConfig {
            service_aaaa: true,
            ..offline
        };
        let (zone, _) = render_zone(&input, "home.example.org", &aaaa, None);
        assert!(zone.contains("jellyfin IN AAAA fd00::11"), "{zone}");
        assert_eq!(
            zone.matches("jellyfin IN AAAA").count(),
            1,
            "node2 has no IPv6: {zone}"
        );
        let zones = render_name_zones(&input, &aaaa, &BTreeMap::new());
        assert!(
            zones["jellyfin.home.example.org"]
                .0
                .contains("@ IN AAAA fd00::11")
        );
        assert!(
            zones["node1.attic.home.example.org"]
                .0
                .contains("@ IN AAAA fd00::11")
        );
    }
}
