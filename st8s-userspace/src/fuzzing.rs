//! Entry points shared by the cargo-fuzz targets (`fuzz/`) and the bounded fuzz test of the
//! suite: whatever the bytes, the userspace parsers answer with a value or an error, never a
//! panic.

use crate::{
    core::plan,
    dns::{self, DnsConfig},
    sources::file::read_cluster,
};

/// Cluster YAML (Nodes, Pods and their `st8s.io/` annotations) through the model and the plan,
/// and the same text through the `st8s dns` collector.
pub fn cluster_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    if let Ok(cluster) = read_cluster(text) {
        for node in cluster.nodes.keys().take(3) {
            let _ = plan::plan(&cluster, node);
        }
        let _ = plan::plan(&cluster, "node1");
    }
    let cfg = DnsConfig {
        domains: vec!["home.example.org".into()],
        zone_label: "st8s.io/zone".into(),
        ttl: 30,
        ns: "localhost.".into(),
        agent_leases: true,
        service_aaaa: true,
        mdns_zones: vec!["attic".into()],
    };
    if let Ok(input) = dns::collect_yaml(text, &cfg, k8s_openapi::jiff::Timestamp::UNIX_EPOCH) {
        let (zone, _) = dns::render_zone(&input, "home.example.org", &cfg, None);
        assert!(zone.contains("IN SOA"), "a rendered zone always has its SOA");
    }
}

/// Annotation values and route matchers on their own.
pub fn annotation_text(data: &[u8]) {
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    let _ = dns::traefik_hosts(text);
    let _ = dns::valid_hostname(text);
    let yaml = format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: p\n  namespace: n\n  annotations:\n    st8s.io/discovery: {text:?}\n    st8s.io/steer: {text:?}\nspec:\n  nodeName: node1\n  containers:\n  - name: c\n    ports:\n    - containerPort: 7359\n      hostPort: 7359\n      protocol: UDP\nstatus:\n  podIP: 10.244.1.2\n  conditions:\n  - type: Ready\n    status: \"True\"\n---\napiVersion: v1\nkind: Node\nmetadata:\n  name: node1\nstatus:\n  addresses:\n  - type: InternalIP\n    address: 10.0.0.11\n  conditions:\n  - type: Ready\n    status: \"True\"\n"
    );
    cluster_text(yaml.as_bytes());
}

/// An mDNS message from the LAN through the parser and the agent's host table, and the table
/// through the Lease annotation into `st8s dns`.
pub fn mdns_message(data: &[u8]) {
    use crate::dns::mdns::{self, Hosts, Subnet};
    let Ok(records) = mdns::parse_response(data) else {
        return;
    };
    let mut hosts = Hosts::new(vec![Subnet {
        addr: std::net::Ipv4Addr::new(10, 0, 0, 0),
        mask: std::net::Ipv4Addr::new(255, 0, 0, 0),
    }]);
    let now = std::time::Instant::now();
    let _ = hosts.learn(std::net::Ipv4Addr::new(10, 0, 0, 1), &records, now);
    let _ = hosts.due(now + std::time::Duration::from_secs(3600));
    let _ = hosts.expire(now + std::time::Duration::from_secs(1));
    let _ = mdns::host_query(&hosts.snapshot().into_keys().collect::<Vec<_>>());
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A small deterministic generator (xorshift), so that a failure names its seed.
    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: usize) -> usize {
            (self.next() % n.max(1) as u64) as usize
        }
    }

    const SEEDS: &[&str] = &[
        include_str!("../../deploy/examples/home/jellyfin.yaml"),
        "apiVersion: v1\nkind: List\nitems:\n- apiVersion: v1\n  kind: Node\n  metadata: {name: node1, labels: {st8s.io/zone: attic}}\n  status: {addresses: [{type: InternalIP, address: 10.0.0.11}], conditions: [{type: Ready, status: \"True\"}]}\n- apiVersion: v1\n  kind: Pod\n  metadata: {name: web, namespace: n, annotations: {st8s.io/discovery: \"7359/udp\"}}\n  spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 8080, hostPort: 80}]}]}\n  status: {podIP: 10.244.1.2, conditions: [{type: Ready, status: \"True\"}]}\n",
        "apiVersion: networking.k8s.io/v1\nkind: Ingress\nmetadata: {name: a, namespace: b, annotations: {st8s.io/exposure: wan}}\nspec: {rules: [{host: a.home.example.org}]}\n---\napiVersion: traefik.io/v1alpha1\nkind: IngressRoute\nmetadata: {name: r, namespace: b}\nspec: {routes: [{match: \"Host(`x.home.example.org`) || Host(`y.home.example.org`)\"}]}\n",
    ];

    /// Bounded: 3,000 mutations of the seeds (byte flips, cuts, splices, repeats) and 1,000
    /// random annotation values, in about a second. cargo-fuzz (`cargo xtask fuzz`) goes further.
    #[test]
    fn the_parsers_never_panic_on_mutated_input() {
        let mut rng = Rng(0x5717_8500_dead_beef);
        let alphabet = b" \n:-{}[],\"'`/*&|!%#@0123456789abcdefghijklmnopqrstuvwxyzAPIVNodePdstatus.\t\\";
        for round in 0..3000 {
            let mut b = SEEDS[rng.below(SEEDS.len())].as_bytes().to_vec();
            for _ in 0..=rng.below(8) {
                let at = rng.below(b.len());
                match rng.below(5) {
                    0 => b[at] = alphabet[rng.below(alphabet.len())],
                    1 => b.truncate(at),
                    2 => {
                        let end = (at + rng.below(64)).min(b.len());
                        let piece = b[at..end].to_vec();
                        let to = rng.below(b.len());
                        b.splice(to..to, piece);
                    }
                    3 => b.insert(at, alphabet[rng.below(alphabet.len())]),
                    _ => {
                        let end = (at + rng.below(16)).min(b.len());
                        b.drain(at..end);
                    }
                }
                if b.is_empty() {
                    break;
                }
            }
            let r = std::panic::catch_unwind(|| cluster_text(&b));
            assert!(
                r.is_ok(),
                "round {round} panicked on:\n{}",
                String::from_utf8_lossy(&b)
            );
        }
        // An avahi host announcement (A, cache flush, TTL 120) with a compressed PTR after it.
        let announcement: &[u8] = &[
            0, 0, 0x84, 0, 0, 0, 0, 2, 0, 0, 0, 0, 7, b's', b't', b'u', b'c', b'h', b'i', b'p', 5, b'l',
            b'o', b'c', b'a', b'l', 0, 0, 1, 0x80, 1, 0, 0, 0, 120, 0, 4, 10, 0, 0, 60, 0xc0, 12, 0, 12, 0,
            1, 0, 0, 0, 120, 0, 2, 0xc0, 20,
        ];
        assert_eq!(
            crate::dns::mdns::parse_response(announcement).map(|r| r.len()),
            Ok(2),
            "the seed is a valid message"
        );
        for round in 0..2000 {
            let mut b = announcement.to_vec();
            for _ in 0..=rng.below(6) {
                let at = rng.below(b.len());
                match rng.below(3) {
                    0 => b[at] = rng.next() as u8,
                    1 => b.truncate(at),
                    _ => b.insert(at, rng.next() as u8),
                }
                if b.is_empty() {
                    break;
                }
            }
            let r = std::panic::catch_unwind(|| mdns_message(&b));
            assert!(r.is_ok(), "round {round} panicked on {b:?}");
        }
        for round in 0..1000 {
            let len = rng.below(40);
            let v: Vec<u8> = (0..len).map(|_| alphabet[rng.below(alphabet.len())]).collect();
            let r = std::panic::catch_unwind(|| annotation_text(&v));
            assert!(
                r.is_ok(),
                "round {round} panicked on {:?}",
                String::from_utf8_lossy(&v)
            );
        }
    }
}
