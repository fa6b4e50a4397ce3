//! Fast failover: each agent checks that the other nodes are reachable, and steers no new or
//! existing flow to a node that is not.
//!
//! The probe is a TCP connect to the peer's health port. A completed handshake, and also a
//! refused one (RST), prove that the peer's kernel, and with it its pinned dataplane, is
//! reachable: an agent that restarts (a rolling update) does not make its node look dead. Only
//! silence (a timeout, or "host unreachable") counts as a failure, and `failures` of those in a
//! row make the node unreachable. One answer brings it back.
//!
//! Why not the Kubernetes API: a node is marked NotReady only after 40 s or more, Leases only
//! after their duration, and in a home cluster the API server may sit on the very node that
//! died. Direct probes notice in `interval * failures` (about 0.6 s by default) and need nothing
//! but the LAN.

use std::{
    collections::{BTreeMap, BTreeSet},
    io,
    net::{Ipv4Addr, SocketAddr},
    time::Duration,
};

use tokio::sync::{mpsc, watch};
use tracing::{info, warn};

/// What one probe found.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Outcome {
    /// The peer's kernel answered (accepted or refused the connection).
    Alive,
    /// No answer in time, or no route to it.
    Silent,
}

/// Consecutive silent probes per peer, and which peers are unreachable. Pure: tested without a network.
#[derive(Debug, Default)]
pub struct Tracker {
    silent: BTreeMap<Ipv4Addr, u32>,
    unreachable: BTreeSet<Ipv4Addr>,
}

impl Tracker {
    /// Folds one round of results in (peers absent from `results` are forgotten); returns the
    /// set of unreachable peers when it changed.
    pub fn round(
        &mut self,
        results: &BTreeMap<Ipv4Addr, Outcome>,
        failures: u32,
    ) -> Option<BTreeSet<Ipv4Addr>> {
        self.silent.retain(|a, _| results.contains_key(a));
        let before = self.unreachable.clone();
        self.unreachable.retain(|a| results.contains_key(a));
        for (addr, outcome) in results {
            match outcome {
                Outcome::Alive => {
                    self.silent.remove(addr);
                    if self.unreachable.remove(addr) {
                        info!(peer = %addr, "peer reachable again");
                    }
                }
                Outcome::Silent => {
                    let n = self.silent.entry(*addr).or_default();
                    *n += 1;
                    if *n >= failures && self.unreachable.insert(*addr) {
                        warn!(peer = %addr, probes = *n, "peer unreachable: it gets no flows and no DNS answers until it answers again");
                    }
                }
            }
        }
        (self.unreachable != before).then(|| self.unreachable.clone())
    }
}

/// One probe: a TCP connect with a timeout.
pub async fn probe(addr: SocketAddr, timeout: Duration) -> Outcome {
    match tokio::time::timeout(timeout, tokio::net::TcpStream::connect(addr)).await {
        Ok(Ok(_)) => Outcome::Alive,
        Ok(Err(e)) if e.kind() == io::ErrorKind::ConnectionRefused => Outcome::Alive,
        Ok(Err(_)) | Err(_) => Outcome::Silent,
    }
}

/// How the other nodes are probed: the same flags, with the same meaning, for `st8s agent` and
/// `st8s dns`.
#[derive(Clone, Debug, clap::Args)]
pub struct PeerProbeArgs {
    /// How often to probe the other nodes (a TCP connect to their --peer-port). A node that stays
    /// silent for --peer-failures probes in a row is unreachable: it gets no flows and no DNS
    /// answers until it answers again. 0: no probing.
    #[arg(long, value_name = "MS", default_value_t = 200, alias = "probe-ms")]
    pub peer_probe_ms: u64,
    /// Silent probes in a row before a node is unreachable.
    #[arg(long, value_name = "N", default_value_t = 3, alias = "probe-failures")]
    pub peer_failures: u32,
    /// The port probed on the other nodes (their agents' --listen port). A refused connection
    /// counts as an answer: the node is up even while its agent restarts.
    #[arg(long, value_name = "PORT", default_value_t = 9470, alias = "probe-port")]
    pub peer_port: u16,
}

/// The prober as its owner holds it: tell it whom to probe, hear which peers are unreachable.
pub struct Prober {
    peers: watch::Sender<Vec<Ipv4Addr>>,
    unreachable: mpsc::Receiver<BTreeSet<Ipv4Addr>>,
}

impl Prober {
    /// Probes as `args` say (`--peer-probe-ms 0`: no probing; [`recv`](Self::recv) then never
    /// resolves).
    pub fn start(args: &PeerProbeArgs) -> Self {
        let (peers, peers_rx) = watch::channel(Vec::new());
        let (tx, unreachable) = mpsc::channel(16);
        if args.peer_probe_ms > 0 {
            spawn(
                peers_rx,
                args.peer_port,
                Duration::from_millis(args.peer_probe_ms),
                args.peer_failures,
                tx,
            );
        }
        Prober { peers, unreachable }
    }

    /// A prober that probes nothing: the sets of unreachable peers come from the returned sender
    /// (tests of the agent's loop decide which peers are silent).
    pub fn manual() -> (Self, mpsc::Sender<BTreeSet<Ipv4Addr>>) {
        let (peers, _) = watch::channel(Vec::new());
        let (tx, unreachable) = mpsc::channel(16);
        (Prober { peers, unreachable }, tx)
    }

    /// The peers to probe from now on.
    pub fn follow(&self, peers: Vec<Ipv4Addr>) {
        self.peers.send_if_modified(|p| {
            let changed = *p != peers;
            *p = peers;
            changed
        });
    }

    /// The set of unreachable peers, when it changes.
    pub async fn recv(&mut self) -> BTreeSet<Ipv4Addr> {
        match self.unreachable.recv().await {
            Some(d) => d,
            None => std::future::pending().await,
        }
    }
}

/// Probes the peers in `peers` (kept current by the agent) every `interval`, and sends the set
/// of unreachable peers whenever it changes.
fn spawn(
    mut peers: watch::Receiver<Vec<Ipv4Addr>>,
    port: u16,
    interval: Duration,
    failures: u32,
    tx: mpsc::Sender<BTreeSet<Ipv4Addr>>,
) {
    tokio::spawn(async move {
        let mut tracker = Tracker::default();
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tick.tick().await;
            let targets = peers.borrow_and_update().clone();
            let probes = targets
                .iter()
                .map(|a| probe(SocketAddr::from((*a, port)), interval));
            let outcomes = futures::future::join_all(probes).await;
            let results: BTreeMap<Ipv4Addr, Outcome> = targets.into_iter().zip(outcomes).collect();
            if let Some(unreachable) = tracker.round(&results, failures.max(1))
                && tx.send(unreachable).await.is_err()
            {
                return;
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    fn a(s: &str) -> Ipv4Addr {
        s.parse().expect("address")
    }

    #[test]
    fn a_peer_is_down_after_enough_silence_and_up_at_the_first_answer() {
        let mut t = Tracker::default();
        let round = |t: &mut Tracker, o: Outcome| {
            t.round(&[(a("10.0.0.2"), o), (a("10.0.0.3"), Outcome::Alive)].into(), 3)
        };
        assert_eq!(round(&mut t, Outcome::Silent), None);
        assert_eq!(round(&mut t, Outcome::Silent), None);
        assert_eq!(round(&mut t, Outcome::Silent), Some([a("10.0.0.2")].into()));
        assert_eq!(round(&mut t, Outcome::Silent), None, "no news");
        assert_eq!(round(&mut t, Outcome::Alive), Some(BTreeSet::new()));
        // One silent probe between answers is not enough.
        assert_eq!(round(&mut t, Outcome::Silent), None);
        assert_eq!(round(&mut t, Outcome::Alive), None);
        assert_eq!(round(&mut t, Outcome::Silent), None);
        // A peer that leaves the cluster is forgotten, unreachable or not.
        for _ in 0..3 {
            round(&mut t, Outcome::Silent);
        }
        assert_eq!(
            t.round(&[(a("10.0.0.3"), Outcome::Alive)].into(), 3),
            Some(BTreeSet::new())
        );
    }

    #[tokio::test]
    async fn refused_and_accepted_both_count_as_alive() {
        // A port nobody listens on, on loopback: the kernel refuses at once.
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        let free = l.local_addr().expect("addr");
        drop(l);
        assert_eq!(probe(free, Duration::from_millis(500)).await, Outcome::Alive);
        let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind");
        assert_eq!(
            probe(l.local_addr().expect("addr"), Duration::from_millis(500)).await,
            Outcome::Alive
        );
    }
}
