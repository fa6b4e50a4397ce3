//! The single owner of the dataplane: holds the table the cluster asks for, the peers that are
//! unreachable and the settling of new backends, and writes the difference when any of them changes.
//! A failed write leaves the runner dirty, so the next tick retries it.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::Arc,
    time::{Duration, Instant},
};

use tracing::{error, info, info_span, warn};

use crate::{
    core::{Desired, Settling},
    dataplane::{Dataplane, Host, Macs},
    http::{ErrorKind, Metrics},
};

pub struct Runner<D> {
    dp: D,
    desired: Desired,
    /// Peers that do not answer probes: the maps hold `desired` without their backends.
    unreachable: BTreeSet<Ipv4Addr>,
    settling: Settling,
    settle: Duration,
    /// When a held backend settles: the maps must be written again then.
    settle_at: Option<Instant>,
    macs: Macs,
    /// The maps lag behind `desired`; cleared only by a successful sync (so failures retry).
    dirty: bool,
    /// When the oldest change not yet in the maps arrived.
    pending_since: Option<Instant>,
    metrics: Arc<Metrics>,
}

impl<D: Dataplane> Runner<D> {
    /// Loads onto the pins, programs the first table, then attaches.
    pub fn start<H: Host<Dataplane = D>>(
        host: &mut H,
        desired: Desired,
        settle: Duration,
        metrics: Arc<Metrics>,
        since: Instant,
    ) -> anyhow::Result<Self> {
        let load_started = Instant::now();
        let dp = host.load(&desired.self_node)?;
        metrics.bpf_load_seconds.set(load_started.elapsed().as_secs_f64());
        let program_started = Instant::now();
        let macs = host.peer_macs(&desired);
        let mut r = Runner {
            dp,
            desired,
            unreachable: BTreeSet::new(),
            settling: Settling::default(),
            settle,
            settle_at: None,
            macs,
            dirty: true,
            pending_since: Some(since),
            metrics: metrics.clone(),
        };
        // Program first, attach second: new programs never see an empty table, and an adopted
        // dataplane keeps forwarding with its old programs until the swap.
        r.sync("initial")?;
        metrics
            .initial_program_seconds
            .set(program_started.elapsed().as_secs_f64());
        r.dp.attach()?;
        metrics.local_clients.set(i64::from(r.dp.steers_local_clients()));
        metrics.set_attach_modes(&r.dp.attach_modes());
        Ok(r)
    }

    pub fn desired(&self) -> &Desired {
        &self.desired
    }

    pub fn into_dataplane(self) -> D {
        self.dp
    }

    /// The other nodes of the current table: whom the prober checks.
    pub fn peers(&self) -> Vec<Ipv4Addr> {
        self.desired.peers().collect()
    }

    pub fn set_desired(&mut self, desired: Desired, since: Instant) {
        if desired != self.desired {
            self.desired = desired;
            self.dirty = true;
            self.pending_since.get_or_insert(since);
        }
    }

    pub fn set_unreachable(&mut self, unreachable: BTreeSet<Ipv4Addr>, since: Instant) {
        if unreachable != self.unreachable {
            self.unreachable = unreachable;
            self.metrics
                .unreachable_nodes
                .set(i64::try_from(self.unreachable.len()).unwrap_or(i64::MAX));
            self.dirty = true;
            self.pending_since.get_or_insert(since);
        }
    }

    pub fn refresh_macs(&mut self, host: &mut impl Host) {
        let macs = host.peer_macs(&self.desired);
        if macs != self.macs {
            self.macs = macs;
            self.dirty = true;
        }
    }

    pub fn sync(&mut self, why: &str) -> anyhow::Result<()> {
        if self.settle_at.is_some_and(|t| Instant::now() >= t) {
            self.dirty = true;
        }
        if !self.dirty {
            return Ok(());
        }
        let span = info_span!(
            "sync",
            why,
            ports = self.desired.ports.len(),
            nodes = self.desired.nodes.len()
        );
        let _g = span.enter();
        let (table, settle_at) = self.settling.apply(
            &self.desired.without_nodes(&self.unreachable),
            Instant::now(),
            self.settle,
        );
        self.settle_at = settle_at;
        let report = self
            .dp
            .apply(&table, &self.macs)
            .inspect_err(|_| self.metrics.error(ErrorKind::MapWrite))?;
        self.dirty = report.retry;
        let latency = self.pending_since.take().map(|since| since.elapsed());
        if let Some(l) = latency {
            self.metrics.observe_sync(l);
        }
        if !report.unresolved.is_empty() {
            warn!(nodes = ?report.unresolved, "MAC of these nodes not resolved yet: not forwarding to them");
        }
        info!(
            writes = report.writes,
            ports_changed = report.ports_changed,
            latency_us = latency.map(|l| l.as_micros() as u64),
            "maps in sync"
        );
        Ok(())
    }

    pub fn sync_logged(&mut self, why: &str) {
        if let Err(e) = self.sync(why) {
            error!(error = format!("{e:#}"), "programming the maps failed; retrying");
        }
    }
}
