//! The map contents of one steered port: its backend list and Maglev row, as the kernel programs
//! read them. Pure: the dataplane writes what this computes.

use std::{collections::BTreeMap, net::Ipv4Addr};

use st8s_common::{BACKEND_DRAINING, BACKEND_LOCAL, Backend};

use super::{maglev, plan::PortPlan};

/// The map contents one port should have (bank and slot aside).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct PortTables {
    pub backends: Vec<Backend>,
    pub maglev: Vec<u8>,
    pub local: Option<(Ipv4Addr, u16)>,
    /// Remote backends left out because their node's MAC is not known yet.
    pub unresolved: Vec<String>,
}

/// Pure: the backend list and Maglev row for one port. Remote backends whose MAC is unknown are
/// left out (and reported) rather than forwarded to a zero address.
pub fn port_tables(
    plan: &PortPlan,
    self_name: &str,
    macs: &BTreeMap<Ipv4Addr, [u8; 6]>,
    seed: u32,
) -> PortTables {
    let mut backends = Vec::new();
    // (name, index in `backends`) of the backends that take new flows.
    let mut active = Vec::new();
    let mut draining = Vec::new();
    let mut unresolved = Vec::new();
    for b in &plan.backends {
        let local = b.node == self_name;
        let mac = if local {
            Some([0; 6])
        } else {
            macs.get(&b.node_addr).copied()
        };
        match mac {
            Some(mac) => {
                let mut flags = if local { BACKEND_LOCAL } else { 0 };
                if b.draining {
                    flags |= BACKEND_DRAINING;
                    draining.push((b.node.as_str(), backends.len() as u8));
                } else {
                    active.push((b.node.as_str(), backends.len() as u8));
                }
                backends.push(Backend {
                    node_addr_be: u32::from(b.node_addr).to_be(),
                    node_mac: mac,
                    flags,
                    _pad: 0,
                });
            }
            None => unresolved.push(b.node.clone()),
        }
    }
    // New flows go to the active backends only. With none left, the table names draining ones,
    // which the programs refuse for a new flow (the kernel then answers it).
    let pool = if active.is_empty() { draining } else { active };
    let names: Vec<&str> = pool.iter().map(|(n, _)| *n).collect();
    let maglev = maglev::table(&names, seed)
        .into_iter()
        .map(|i| pool.get(usize::from(i)).map_or(0, |(_, full)| *full))
        .collect();
    PortTables {
        maglev,
        backends,
        local: plan.local.as_ref().map(|l| (l.addr, l.port)),
        unresolved,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::plan::{BackendEntry, LocalBackend};

    fn plan(nodes: &[(&str, &str)], local: bool) -> PortPlan {
        PortPlan {
            backends: nodes
                .iter()
                .map(|(n, a)| BackendEntry {
                    node: (*n).into(),
                    node_addr: a.parse().expect("test address"),
                    pod: format!("p-{n}"),
                    draining: false,
                })
                .collect(),
            local: local.then(|| LocalBackend {
                pod: "p".into(),
                addr: "10.244.1.2".parse().expect("test address"),
                addr6: None,
                port: 8080,
                discovery: false,
                draining: false,
            }),
        }
    }

    #[test]
    fn local_backend_is_flagged_and_unresolved_peers_left_out() {
        let macs = BTreeMap::from([("10.0.0.12".parse().expect("test address"), [2, 0, 0, 0, 0, 12])]);
        let t = port_tables(
            &plan(
                &[
                    ("node1", "10.0.0.11"),
                    ("node2", "10.0.0.12"),
                    ("node3", "10.0.0.13"),
                ],
                true,
            ),
            "node1",
            &macs,
            1,
        );
        assert_eq!(t.backends.len(), 2);
        assert_eq!(t.backends[0].flags, BACKEND_LOCAL);
        assert_eq!(t.backends[1].node_mac, [2, 0, 0, 0, 0, 12]);
        assert_eq!(
            t.backends[1].node_addr_be,
            u32::from_be_bytes([10, 0, 0, 12]).to_be()
        );
        assert_eq!(t.unresolved, ["node3"]);
        assert!(t.maglev.iter().all(|&i| i < 2));
        assert_eq!(t.local, Some(("10.244.1.2".parse().expect("test address"), 8080)));
    }
}
