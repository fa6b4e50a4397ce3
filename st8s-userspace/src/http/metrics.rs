//! The agent's metrics, as prometheus-client families (the shape kube-rs's controller-rs uses).
//!
//! The agent records into typed fields as things happen. The per-port packet counters are read
//! from the pinned maps at scrape time: a small per-CPU array, one entry per steered port. The
//! map occupancy (the flow table holds up to 65,536 entries) is counted in the background every
//! [`CENSUS_EVERY`], never by a scrape.

use std::{
    path::{Path, PathBuf},
    sync::{
        Mutex,
        atomic::{AtomicBool, AtomicU64, Ordering},
    },
    time::Duration,
};

use prometheus_client::{
    collector::Collector,
    encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric as _},
    metrics::{MetricType, counter::Counter, family::Family, gauge::Gauge, histogram::Histogram},
    registry::Registry,
};
use st8s_common::{MAX_FLOWS, MAX_NODES, MAX_PORTS, map_names};
use tracing::debug;

use crate::{dataplane::inspect, sources::kube::WatchFailure};

/// Upper bounds (seconds) of the sync-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

/// How often the map occupancy is counted.
pub const CENSUS_EVERY: Duration = Duration::from_secs(15);

/// What went wrong, as `st8s_errors_total` counts it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ErrorKind {
    /// A watch of the Kubernetes API failed.
    Watch(WatchFailure),
    /// The cluster file was refused (it stays at its last good state).
    BadUpdate,
    /// The cluster cannot be programmed on this node.
    Plan,
    /// A map write failed (retried).
    MapWrite,
    /// The agent's Lease could not be renewed.
    Lease,
}

impl ErrorKind {
    /// Every kind, each watch failure included.
    pub fn all() -> impl Iterator<Item = Self> {
        WatchFailure::ALL.into_iter().map(Self::Watch).chain([
            Self::BadUpdate,
            Self::Plan,
            Self::MapWrite,
            Self::Lease,
        ])
    }

    /// The `kind` label.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Watch(f) => f.label(),
            Self::BadUpdate => "bad_update",
            Self::Plan => "plan",
            Self::MapWrite => "map_write",
            Self::Lease => "lease",
        }
    }
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct KindLabel {
    kind: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct AttachLabels {
    hook: &'static str,
    mode: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct MapLabel {
    map: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct PortLabels {
    port: String,
    result: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ReasonLabels {
    reason: &'static str,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
struct ZoneLabel {
    zone: String,
}

/// What `st8s dns` records besides the shared families (registered by [`Metrics::for_dns`]).
#[derive(Debug, Default)]
struct DnsMetrics {
    zone_writes: Family<ZoneLabel, Counter>,
    zones_removed: Counter,
    hostnames: Gauge,
    serving_nodes: Gauge,
    write_latency: Option<Histogram>,
}

type FloatGauge = Gauge<f64, AtomicU64>;

/// What the agent records for `/metrics` and `/readyz`.
#[derive(Debug)]
pub struct Metrics {
    registry: Registry,
    ready: Gauge,
    not_ready_reason: Mutex<Option<String>>,
    sync_latency: Histogram,
    syncs: Counter,
    objects: Family<KindLabel, Gauge>,
    errors: Family<KindLabel, Counter>,
    map_entries: Family<MapLabel, Gauge>,
    pub bpf_load_seconds: FloatGauge,
    pub initial_program_seconds: FloatGauge,
    pub initial_list_seconds: FloatGauge,
    pub unreachable_nodes: Gauge,
    pub local_clients: Gauge,
    attach: Family<AttachLabels, Gauge>,
    dns: DnsMetrics,
    /// Where the maps are pinned: the census counts their entries.
    pin_dir: Option<PathBuf>,
    census_started: AtomicBool,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new(None)
    }
}

impl Metrics {
    /// Metrics of an agent whose maps are pinned under `pin_dir` (none: no map metrics).
    pub fn new(pin_dir: Option<PathBuf>) -> Self {
        let mut r = Registry::with_prefix("st8s");
        let ready = Gauge::default();
        r.register(
            "ready",
            "1 once the first full sync is programmed and the source is healthy",
            ready.clone(),
        );
        let sync_latency = Histogram::new(LATENCY_BUCKETS);
        r.register(
            "sync_latency_seconds",
            "Time from a source event to the map update that reflects it",
            sync_latency.clone(),
        );
        let syncs = Counter::default();
        r.register("syncs", "Map syncs applied", syncs.clone());
        let objects = Family::<KindLabel, Gauge>::default();
        r.register(
            "objects",
            "Cluster objects the agent knows of, by kind",
            objects.clone(),
        );
        let errors = Family::<KindLabel, Counter>::default();
        // Every kind at 0 from the start: a rate over it reads 0, not "no data", and a
        // dashboard's query finds the series before the first error.
        for kind in ErrorKind::all() {
            let _ = errors.get_or_create(&KindLabel { kind: kind.label() });
        }
        r.register("errors", "Errors by kind", errors.clone());
        let map_entries = Family::<MapLabel, Gauge>::default();
        r.register(
            "map_entries",
            "Entries in each map, counted in the background",
            map_entries.clone(),
        );
        let capacity = Family::<MapLabel, Gauge>::default();
        for (map, cap) in capacities() {
            capacity.get_or_create(&MapLabel { map }).set(i64::from(cap));
        }
        r.register("map_capacity", "Capacity of each map", capacity);
        let bpf_load_seconds = FloatGauge::default();
        r.register(
            "bpf_load_seconds",
            "Time to load the programs (verifier included) and adopt the pinned maps at start",
            bpf_load_seconds.clone(),
        );
        let initial_program_seconds = FloatGauge::default();
        r.register(
            "initial_program_seconds",
            "Time to plan and write the first full table into the maps",
            initial_program_seconds.clone(),
        );
        let initial_list_seconds = FloatGauge::default();
        r.register(
            "initial_list_seconds",
            "Time from the first watch event to the complete initial list",
            initial_list_seconds.clone(),
        );
        let unreachable_nodes = Gauge::default();
        r.register(
            "unreachable_nodes",
            "Other nodes that do not answer probes; no flow is steered to them",
            unreachable_nodes.clone(),
        );
        let local_clients = Gauge::default();
        r.register(
            "local_clients_steered",
            "1 while clients on this node itself (its processes and pods) are steered by the cgroup socket hooks; 0 without cgroup v2 or with --cgroup off",
            local_clients.clone(),
        );
        let attach = Family::<AttachLabels, Gauge>::default();
        r.register(
            "attach_mode",
            "1 for the way each hook is attached: xdp native|off, tc tcx|netlink (kernels before 6.6), socket cgroup|off",
            attach.clone(),
        );
        r.register_collector(Box::new(PortPackets {
            pin_dir: pin_dir.clone(),
        }));
        Metrics {
            registry: r,
            ready,
            not_ready_reason: Mutex::new(Some("starting".into())),
            sync_latency,
            syncs,
            objects,
            errors,
            map_entries,
            bpf_load_seconds,
            initial_program_seconds,
            initial_list_seconds,
            unreachable_nodes,
            local_clients,
            attach,
            dns: DnsMetrics::default(),
            pin_dir,
            census_started: AtomicBool::new(false),
        }
    }

    /// The metrics of `st8s dns`: the shared families (readiness, errors) and its own:
    /// `st8s_dns_zone_writes_total{zone}` (a zone, a ConfigMap key or a per-name zone file,
    /// written because its content changed), `st8s_dns_zones_removed_total`,
    /// `st8s_dns_hostnames`, `st8s_dns_serving_nodes` and `st8s_dns_write_latency_seconds`
    /// (from the watch event to the write that reflects it).
    pub fn for_dns() -> Self {
        let mut m = Self::new(None);
        let d = &mut m.dns;
        m.registry.register(
            "dns_zone_writes",
            "Zones written by st8s dns because their content changed (ConfigMap keys or zone files)",
            d.zone_writes.clone(),
        );
        m.registry.register(
            "dns_zones_removed",
            "Zone files st8s dns removed (a name no longer published)",
            d.zones_removed.clone(),
        );
        m.registry.register(
            "dns_hostnames",
            "Hostnames st8s dns publishes",
            d.hostnames.clone(),
        );
        m.registry.register(
            "dns_serving_nodes",
            "Nodes whose agent is ready and that answer probes: the addresses the zones give",
            d.serving_nodes.clone(),
        );
        let latency = Histogram::new(LATENCY_BUCKETS);
        m.registry.register(
            "dns_write_latency_seconds",
            "Time from a watch event to the zone write that reflects it",
            latency.clone(),
        );
        d.write_latency = Some(latency);
        m
    }

    /// `st8s dns` wrote these zones, `latency` after the earliest event behind them.
    pub fn zones_written<'a>(&self, zones: impl IntoIterator<Item = &'a str>, latency: Option<Duration>) {
        let mut any = false;
        for zone in zones {
            self.dns
                .zone_writes
                .get_or_create(&ZoneLabel {
                    zone: zone.to_owned(),
                })
                .inc();
            any = true;
        }
        if let (true, Some(h), Some(l)) = (any, &self.dns.write_latency, latency) {
            h.observe(l.as_secs_f64());
        }
    }

    pub fn zones_removed(&self, n: usize) {
        self.dns.zones_removed.inc_by(n as u64);
    }

    /// What the zones publish: hostnames and serving nodes.
    pub fn set_published(&self, hostnames: usize, serving_nodes: usize) {
        self.dns
            .hostnames
            .set(i64::try_from(hostnames).unwrap_or(i64::MAX));
        self.dns
            .serving_nodes
            .set(i64::try_from(serving_nodes).unwrap_or(i64::MAX));
    }

    /// How the hooks are attached, `(hook, mode)`: one series per hook, set to 1.
    pub fn set_attach_modes(&self, modes: &[(&'static str, &'static str)]) {
        self.attach.clear();
        for &(hook, mode) in modes {
            self.attach.get_or_create(&AttachLabels { hook, mode }).set(1);
        }
    }

    pub fn set_ready(&self, ready: bool, reason: Option<&str>) {
        self.ready.set(i64::from(ready));
        if let Ok(mut r) = self.not_ready_reason.lock() {
            *r = reason.map(str::to_owned);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.get() == 1
    }

    /// Why the agent is not ready.
    pub fn not_ready_reason(&self) -> String {
        self.not_ready_reason
            .lock()
            .ok()
            .and_then(|r| r.clone())
            .unwrap_or_else(|| "starting".into())
    }

    pub fn observe_sync(&self, latency: Duration) {
        self.sync_latency.observe(latency.as_secs_f64());
        self.syncs.inc();
    }

    pub fn set_objects(&self, kind: &'static str, n: usize) {
        self.objects
            .get_or_create(&KindLabel { kind })
            .set(i64::try_from(n).unwrap_or(i64::MAX));
    }

    pub fn error(&self, kind: ErrorKind) {
        self.errors.get_or_create(&KindLabel { kind: kind.label() }).inc();
    }

    /// How many errors of this kind were counted.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.errors.get_or_create(&KindLabel { kind: kind.label() }).get()
    }

    /// Counts the maps' entries every [`CENSUS_EVERY`], off the scrape path (started once).
    pub fn start_census(self: &std::sync::Arc<Self>) {
        if self.census_started.swap(true, Ordering::Relaxed) {
            return;
        }
        let Some(dir) = self.pin_dir.clone() else {
            return;
        };
        let me = self.clone();
        tokio::spawn(async move {
            loop {
                let d = dir.clone();
                match tokio::task::spawn_blocking(move || inspect::map_entries(&d)).await {
                    Ok(Ok(counts)) => {
                        for (map, n) in counts {
                            me.map_entries
                                .get_or_create(&MapLabel { map })
                                .set(i64::try_from(n).unwrap_or(i64::MAX));
                        }
                    }
                    Ok(Err(e)) => debug!(error = %e, "no pinned maps to count yet"),
                    Err(e) => debug!(error = %e, "map census failed"),
                }
                tokio::time::sleep(CENSUS_EVERY).await;
            }
        });
    }

    /// The OpenMetrics text exposition.
    pub fn render(&self) -> String {
        let mut o = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut o, &self.registry) {
            debug!(error = %e, "encoding the metrics failed");
        }
        o
    }
}

fn capacities() -> [(&'static str, u32); 4] {
    [
        (map_names::PORTS, MAX_PORTS),
        (map_names::NODES, MAX_NODES),
        (map_names::FLOWS, MAX_FLOWS),
        (map_names::REVNAT, MAX_FLOWS),
    ]
}

/// `st8s_port_packets_total`, read from the pinned per-port counters at scrape time.
#[derive(Debug)]
struct PortPackets {
    pin_dir: Option<PathBuf>,
}

impl Collector for PortPackets {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let Some(dir) = &self.pin_dir else {
            return Ok(());
        };
        let ports = match inspect::port_counters(Path::new(dir)) {
            Ok(p) => p,
            Err(e) => {
                debug!(error = %e, "no pinned maps to report yet");
                return Ok(());
            }
        };
        let family = Family::<PortLabels, Counter>::default();
        for (port, c) in ports {
            for (result, n) in inspect::by_result(&c) {
                family
                    .get_or_create(&PortLabels {
                        port: port.clone(),
                        result,
                    })
                    .inc_by(n);
            }
        }
        let m = encoder.encode_descriptor(
            "port_packets",
            "Packets per steered port and outcome (st8s inspect columns)",
            None,
            MetricType::Counter,
        )?;
        family.encode(m)?;
        let Ok(global) = inspect::global_counters(Path::new(dir)) else {
            return Ok(());
        };
        let family = Family::<ReasonLabels, Counter>::default();
        for (reason, n) in inspect::without_port(&global) {
            family.get_or_create(&ReasonLabels { reason }).inc_by(n);
        }
        let m = encoder.encode_descriptor(
            "packets_without_port",
            "Packets st8s cannot tie to a steered port, by reason (st8s inspect's last line)",
            None,
            MetricType::Counter,
        )?;
        family.encode(m)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn st8s_dns_has_its_zone_families_and_the_agent_has_none() {
        let m = Metrics::for_dns();
        m.zones_written(
            ["home.example.org", "jellyfin.home.example.org"],
            Some(Duration::from_millis(4)),
        );
        m.zones_written(["home.example.org"], None);
        m.zones_written([], Some(Duration::from_millis(9)));
        m.zones_removed(2);
        m.set_published(5, 2);
        let text = m.render();
        for line in [
            "st8s_dns_zone_writes_total{zone=\"home.example.org\"} 2",
            "st8s_dns_zone_writes_total{zone=\"jellyfin.home.example.org\"} 1",
            "st8s_dns_zones_removed_total 2",
            "st8s_dns_hostnames 5",
            "st8s_dns_serving_nodes 2",
            "st8s_dns_write_latency_seconds_count 1",
            "st8s_dns_write_latency_seconds_bucket{le=\"0.005\"} 1",
        ] {
            assert!(text.contains(line), "{line} in:\n{text}");
        }
        assert!(!Metrics::default().render().contains("st8s_dns_"));
    }

    #[test]
    fn the_exposition_names_every_family_once_with_its_labels() {
        let m = Metrics::default();
        m.observe_sync(Duration::from_millis(3));
        m.error(ErrorKind::Watch(WatchFailure::Unreachable));
        m.error(ErrorKind::MapWrite);
        m.error(ErrorKind::MapWrite);
        m.set_objects("pod", 7);
        m.unreachable_nodes.set(1);
        let text = m.render();
        for line in [
            "st8s_sync_latency_seconds_bucket{le=\"0.005\"} 1",
            "st8s_sync_latency_seconds_count 1",
            "st8s_syncs_total 1",
            "st8s_errors_total{kind=\"api_unreachable\"} 1",
            "st8s_errors_total{kind=\"map_write\"} 2",
            "st8s_objects{kind=\"pod\"} 7",
            "st8s_map_capacity{map=\"ST8S_FLOWS\"} 65536",
            "st8s_unreachable_nodes 1",
            "st8s_ready 0",
        ] {
            assert!(text.lines().any(|l| l == line), "{line} missing from\n{text}");
        }
        assert_eq!(m.errors(ErrorKind::MapWrite), 2);
        assert!(text.ends_with("# EOF\n"), "{text}");
        for line in text.lines().filter(|l| !l.starts_with('#')) {
            assert!(line.starts_with("st8s_"), "{line}");
        }
    }
}
