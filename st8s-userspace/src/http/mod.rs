//! `/healthz`, `/readyz` and `/metrics` (Prometheus text format), served by the agent.
//!
//! The packet counters and map occupancy are read from the pinned maps at scrape time, so a
//! scrape never waits for the agent's sync loop; everything else is recorded by the agent in
//! [`Metrics`].

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{
        Arc, Mutex,
        atomic::{AtomicBool, Ordering},
    },
    time::Duration,
};

use anyhow::Context as _;
use st8s_common::{MAX_FLOWS, MAX_NODES, MAX_PORTS};
use tokio::{
    io::{AsyncReadExt as _, AsyncWriteExt as _},
    net::TcpListener,
};
use tracing::{debug, warn};

use crate::sources::kube::WatchFailure;

/// Upper bounds (seconds) of the sync-latency histogram buckets.
pub const LATENCY_BUCKETS: [f64; 12] = [
    0.0005, 0.001, 0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0,
];

#[derive(Debug, Default, Clone)]
pub struct Histogram {
    pub counts: [u64; LATENCY_BUCKETS.len()],
    pub count: u64,
    pub sum: f64,
}

impl Histogram {
    pub fn observe(&mut self, d: Duration) {
        let s = d.as_secs_f64();
        for (i, b) in LATENCY_BUCKETS.iter().enumerate() {
            if s <= *b {
                self.counts[i] += 1;
            }
        }
        self.count += 1;
        self.sum += s;
    }

    /// The upper bound of the bucket holding quantile `q` (an over-estimate, as in Prometheus).
    pub fn quantile(&self, q: f64) -> Option<f64> {
        if self.count == 0 {
            return None;
        }
        let want = (q * self.count as f64).ceil() as u64;
        LATENCY_BUCKETS
            .iter()
            .zip(self.counts)
            .find(|(_, c)| *c >= want)
            .map(|(b, _)| *b)
    }
}

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

/// What the agent records for `/metrics` and `/readyz`.
#[derive(Debug, Default)]
pub struct Metrics {
    ready: AtomicBool,
    inner: Mutex<Inner>,
}

#[derive(Debug, Default)]
struct Inner {
    sync_latency: Histogram,
    syncs: u64,
    objects: BTreeMap<&'static str, u64>,
    errors: BTreeMap<String, u64>,
    gauges: BTreeMap<&'static str, (f64, &'static str)>,
    not_ready_reason: Option<String>,
}

impl Metrics {
    pub fn set_ready(&self, ready: bool, reason: Option<&str>) {
        self.ready.store(ready, Ordering::Relaxed);
        if let Ok(mut i) = self.inner.lock() {
            i.not_ready_reason = reason.map(str::to_owned);
        }
    }

    pub fn is_ready(&self) -> bool {
        self.ready.load(Ordering::Relaxed)
    }

    pub fn observe_sync(&self, latency: Duration) {
        if let Ok(mut i) = self.inner.lock() {
            i.sync_latency.observe(latency);
            i.syncs += 1;
        }
    }

    pub fn set_objects(&self, kind: &'static str, n: usize) {
        if let Ok(mut i) = self.inner.lock() {
            i.objects.insert(kind, n as u64);
        }
    }

    /// A named gauge, rendered as `st8s_<name>` with its help text.
    pub fn set_gauge(&self, name: &'static str, value: f64, help: &'static str) {
        if let Ok(mut i) = self.inner.lock() {
            i.gauges.insert(name, (value, help));
        }
    }

    pub fn error(&self, kind: ErrorKind) {
        if let Ok(mut i) = self.inner.lock() {
            *i.errors.entry(kind.label().to_owned()).or_default() += 1;
        }
    }

    /// How many errors of this kind were counted.
    pub fn errors(&self, kind: ErrorKind) -> u64 {
        self.inner
            .lock()
            .map(|i| i.errors.get(kind.label()).copied().unwrap_or_default())
            .unwrap_or_default()
    }

    pub fn latency(&self) -> Histogram {
        self.inner
            .lock()
            .map(|i| i.sync_latency.clone())
            .unwrap_or_default()
    }

    /// The Prometheus text exposition of everything, including the pinned maps under `pin_dir`.
    pub fn render(&self, pin_dir: &std::path::Path) -> String {
        let mut o = String::new();
        let _ = writeln!(
            o,
            "# HELP st8s_ready 1 once the first full sync is programmed and the source is healthy."
        );
        let _ = writeln!(o, "# TYPE st8s_ready gauge");
        let _ = writeln!(o, "st8s_ready {}", u8::from(self.is_ready()));
        if let Ok(i) = self.inner.lock() {
            let _ = writeln!(
                o,
                "# HELP st8s_sync_latency_seconds Time from a source event to the map update that reflects it."
            );
            let _ = writeln!(o, "# TYPE st8s_sync_latency_seconds histogram");
            for (b, c) in LATENCY_BUCKETS.iter().zip(i.sync_latency.counts) {
                let _ = writeln!(o, "st8s_sync_latency_seconds_bucket{{le=\"{b}\"}} {c}");
            }
            let _ = writeln!(
                o,
                "st8s_sync_latency_seconds_bucket{{le=\"+Inf\"}} {}",
                i.sync_latency.count
            );
            let _ = writeln!(o, "st8s_sync_latency_seconds_sum {}", i.sync_latency.sum);
            let _ = writeln!(o, "st8s_sync_latency_seconds_count {}", i.sync_latency.count);
            let _ = writeln!(o, "# HELP st8s_syncs_total Map syncs applied.");
            let _ = writeln!(o, "# TYPE st8s_syncs_total counter");
            let _ = writeln!(o, "st8s_syncs_total {}", i.syncs);
            let _ = writeln!(
                o,
                "# HELP st8s_objects Cluster objects the agent knows of, by kind."
            );
            let _ = writeln!(o, "# TYPE st8s_objects gauge");
            for (k, n) in &i.objects {
                let _ = writeln!(o, "st8s_objects{{kind=\"{k}\"}} {n}");
            }
            for (name, (v, help)) in &i.gauges {
                let _ = writeln!(o, "# HELP st8s_{name} {help}");
                let _ = writeln!(o, "# TYPE st8s_{name} gauge");
                let _ = writeln!(o, "st8s_{name} {v}");
            }
            let _ = writeln!(o, "# HELP st8s_errors_total Errors by kind.");
            let _ = writeln!(o, "# TYPE st8s_errors_total counter");
            for (k, n) in &i.errors {
                let _ = writeln!(o, "st8s_errors_total{{kind=\"{k}\"}} {n}");
            }
        }
        match crate::dataplane::inspect::snapshot(pin_dir) {
            Ok(s) => {
                let _ = writeln!(
                    o,
                    "# HELP st8s_port_packets_total Packets per steered port and outcome (st8s inspect columns)."
                );
                let _ = writeln!(o, "# TYPE st8s_port_packets_total counter");
                for (port, c) in crate::dataplane::inspect::counters_by_port(&s) {
                    for (result, n) in [
                        ("delivered_local", c.delivered_local),
                        ("forwarded", c.forwarded),
                        ("replied", c.replied),
                        ("passed", c.passed),
                        ("untrusted_peer", c.untrusted_peer),
                        ("drop_no_local_backend", c.drop_no_local_backend),
                        ("drop_error", c.drop_error),
                        ("discovered", c.discovered),
                    ] {
                        let _ = writeln!(
                            o,
                            "st8s_port_packets_total{{port=\"{port}\",result=\"{result}\"}} {n}"
                        );
                    }
                }
                let _ = writeln!(o, "# HELP st8s_map_entries Entries in each map.");
                let _ = writeln!(o, "# TYPE st8s_map_entries gauge");
                let _ = writeln!(o, "# HELP st8s_map_capacity Capacity of each map.");
                let _ = writeln!(o, "# TYPE st8s_map_capacity gauge");
                for (map, n, cap) in [
                    ("ST8S_PORTS", s.ports.len(), MAX_PORTS),
                    ("ST8S_NODES", s.nodes.len(), MAX_NODES),
                    ("ST8S_FLOWS", s.flows.len(), MAX_FLOWS),
                    ("ST8S_REVNAT", s.revnat_entries, MAX_FLOWS),
                ] {
                    let _ = writeln!(o, "st8s_map_entries{{map=\"{map}\"}} {n}");
                    let _ = writeln!(o, "st8s_map_capacity{{map=\"{map}\"}} {cap}");
                }
            }
            Err(e) => debug!(error = %e, "no pinned maps to report yet"),
        }
        o
    }
}

/// Serves the endpoints until the runtime shuts down.
pub async fn serve(addr: SocketAddr, metrics: Arc<Metrics>, pin_dir: PathBuf) -> anyhow::Result<()> {
    let listener = TcpListener::bind(addr)
        .await
        .with_context(|| format!("listening on {addr} for health and metrics"))?;
    tracing::info!(%addr, "serving /healthz /readyz /metrics");
    loop {
        let (mut sock, _) = match listener.accept().await {
            Ok(s) => s,
            Err(e) => {
                warn!(error = %e, "accept failed");
                continue;
            }
        };
        let metrics = metrics.clone();
        let pin_dir = pin_dir.clone();
        tokio::spawn(async move {
            let mut buf = [0u8; 2048];
            let n = match tokio::time::timeout(Duration::from_secs(5), sock.read(&mut buf)).await {
                Ok(Ok(n)) => n,
                _ => return,
            };
            let req = String::from_utf8_lossy(&buf[..n]);
            let path = req.split_whitespace().nth(1).unwrap_or("/");
            let (status, body) = match path {
                "/healthz" => ("200 OK", "ok\n".to_owned()),
                "/readyz" if metrics.is_ready() => ("200 OK", "ready\n".to_owned()),
                "/readyz" => {
                    let why = metrics.inner.lock().ok().and_then(|i| i.not_ready_reason.clone());
                    (
                        "503 Service Unavailable",
                        format!("not ready: {}\n", why.unwrap_or_else(|| "starting".into())),
                    )
                }
                "/metrics" => ("200 OK", metrics.render(&pin_dir)),
                _ => ("404 Not Found", "not found\n".to_owned()),
            };
            let head = format!(
                "HTTP/1.1 {status}\r\nContent-Type: text/plain; version=0.0.4\r\nContent-Length: {}\r\nConnection: close\r\n\r\n",
                body.len()
            );
            let _ = sock.write_all(head.as_bytes()).await;
            let _ = sock.write_all(body.as_bytes()).await;
        });
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn histogram_buckets_and_quantiles() {
        let mut h = Histogram::default();
        for ms in [1, 1, 1, 3, 40] {
            h.observe(Duration::from_millis(ms));
        }
        assert_eq!(h.count, 5);
        assert_eq!(h.quantile(0.5), Some(0.001));
        assert_eq!(h.quantile(0.99), Some(0.05));
        let m = Metrics::default();
        m.observe_sync(Duration::from_millis(3));
        m.error(ErrorKind::Watch(WatchFailure::Unreachable));
        m.set_objects("pod", 7);
        let text = m.render(std::path::Path::new("/nonexistent"));
        assert!(
            text.contains("st8s_sync_latency_seconds_bucket{le=\"0.005\"} 1"),
            "{text}"
        );
        assert!(text.contains("st8s_errors_total{kind=\"api_unreachable\"} 1"));
        assert!(text.contains("st8s_objects{kind=\"pod\"} 7"));
        assert!(text.contains("st8s_ready 0"));
    }
}
