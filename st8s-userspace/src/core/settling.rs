//! Make-before-break across nodes: new remote backends wait before they take new flows.

use std::{
    collections::{BTreeMap, BTreeSet},
    time::{Duration, Instant},
};

use super::plan::{Desired, PortId};

/// Make-before-break across nodes. A backend on another node that just became active is held
/// as draining (no new flows) for a moment, so that its own node has programmed its pod before
/// any node sends it new flows: agents learn of a change at slightly different times, and a
/// flow forwarded to a node that has not yet switched to its new pod would be lost. Backends
/// that leave, leave at once. The first table is taken as settled.
#[derive(Debug, Default)]
pub struct Settling {
    since: BTreeMap<(PortId, String), Instant>,
    started: bool,
}

impl Settling {
    /// `desired` with the unsettled remote backends marked draining, and when the next one
    /// settles.
    pub fn apply(&mut self, desired: &Desired, now: Instant, hold: Duration) -> (Desired, Option<Instant>) {
        let settled_at = now.checked_sub(hold).unwrap_or(now);
        let mut out = desired.clone();
        let mut live = BTreeSet::new();
        let mut next: Option<Instant> = None;
        for (id, port) in &mut out.ports {
            for b in port.backends.iter_mut().filter(|b| !b.draining) {
                let key = (*id, b.node.clone());
                let t = *self
                    .since
                    .entry(key.clone())
                    .or_insert(if self.started { now } else { settled_at });
                live.insert(key);
                if b.node != desired.self_node.name && now.duration_since(t) < hold {
                    b.draining = true;
                    let at = t + hold;
                    next = Some(next.map_or(at, |n| n.min(at)));
                }
            }
        }
        self.since.retain(|k, _| live.contains(k));
        self.started = true;
        (out, next)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::plan::{
        plan,
        tests::{WEB_PORT, cluster, pod, three_nodes, web},
    };

    #[test]
    fn new_remote_backends_settle_before_taking_new_flows() {
        let web_a = pod("web-a", "node1", "10.244.1.2", &web());
        let web_b = pod("web-b", "node2", "10.244.2.2", &web());
        let d1 = plan(&cluster(three_nodes(), vec![web_a.clone()]), "node3")
            .expect("plans")
            .desired;
        let d2 = plan(&cluster(three_nodes(), vec![web_a, web_b]), "node3")
            .expect("plans")
            .desired;
        let draining = |d: &Desired| -> Vec<(String, bool)> {
            d.ports[&WEB_PORT]
                .backends
                .iter()
                .map(|b| (b.node.clone(), b.draining))
                .collect()
        };
        let ms = Duration::from_millis;
        let hold = ms(300);
        let t0 = Instant::now();
        let mut s = Settling::default();
        let (first, next) = s.apply(&d1, t0, hold);
        assert_eq!(
            draining(&first),
            [("node1".to_owned(), false)],
            "the first table is settled"
        );
        assert_eq!(next, None);
        let (held, next) = s.apply(&d2, t0 + ms(10), hold);
        assert_eq!(
            draining(&held),
            [("node1".to_owned(), false), ("node2".to_owned(), true)]
        );
        assert_eq!(next, Some(t0 + ms(310)));
        let (settled, next) = s.apply(&d2, t0 + ms(320), hold);
        assert_eq!(
            draining(&settled),
            [("node1".to_owned(), false), ("node2".to_owned(), false)]
        );
        assert_eq!(next, None);
        // Leaving is immediate, and coming back settles again.
        let (gone, _) = s.apply(&d1, t0 + ms(400), hold);
        assert_eq!(draining(&gone), [("node1".to_owned(), false)]);
        let (back, _) = s.apply(&d2, t0 + ms(500), hold);
        assert_eq!(draining(&back)[1], ("node2".to_owned(), true));
    }
}
