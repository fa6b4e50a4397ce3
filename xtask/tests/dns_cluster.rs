//! `st8s dns` on a cluster: the real binary against the API-server double. It watches Nodes,
//! the agents' Leases, Ingresses, HTTPRoutes and Services (Traefik's CRD is not installed here),
//! and keeps the zones ConfigMap by server-side apply. Measures how long a node that turns
//! NotReady, or whose agent's Lease runs out, stays in the answers.

use std::{
    path::PathBuf,
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

use serde_json::{Value, json};
use xtask::apiserver::{ApiServer, Patch, Resource, node};

const NS: &str = "st8s-system";
const CM: &str = "st8s-system/st8s-zones";
const KEY: &str = "home.example.org.db";

fn st8s() -> PathBuf {
    xtask::st8s_debug_bin()
}

/// A Lease as an agent renews it, renewed `ago` before now.
fn lease(node: &str, ago: Duration) -> Value {
    use k8s_openapi::{
        apimachinery::pkg::apis::meta::v1::MicroTime,
        jiff::{SignedDuration, Timestamp},
    };
    let ago = SignedDuration::try_from(ago).expect("duration");
    let renewed = MicroTime(Timestamp::now() - ago);
    json!({
        "metadata": {"name": format!("st8s-agent-{node}"), "namespace": NS},
        "spec": {"holderIdentity": node, "leaseDurationSeconds": 10, "renewTime": renewed}
    })
}

struct Dns {
    child: Child,
    log: PathBuf,
}

impl Dns {
    fn start(kubeconfig: &std::path::Path, tag: &str) -> Dns {
        Self::start_with(kubeconfig, tag, &[])
    }

    fn start_with(kubeconfig: &std::path::Path, tag: &str, extra: &[&str]) -> Dns {
        let log = std::env::temp_dir().join(format!("st8s-dns-cluster-{}-{tag}.log", std::process::id()));
        let child = Command::new(st8s())
            // The double's nodes are at addresses no test may send to: no probes.
            .args([
                "dns",
                "--domain",
                "home.example.org",
                "--namespace",
                NS,
                "--peer-probe-ms",
                "0",
            ])
            .args(extra)
            .env("KUBECONFIG", kubeconfig)
            .env("RUST_LOG", "info")
            .env_remove("KUBERNETES_SERVICE_HOST")
            .stdout(Stdio::null())
            .stderr(std::fs::File::create(&log).expect("log file"))
            .spawn()
            .expect("st8s dns starts");
        Dns { child, log }
    }

    fn log(&self) -> String {
        std::fs::read_to_string(&self.log).unwrap_or_default()
    }
}

impl Drop for Dns {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
        let _ = std::fs::remove_file(&self.log);
    }
}

fn zone_writes(api: &ApiServer) -> Vec<Patch> {
    api.patches()
        .into_iter()
        .filter(|p| p.kind == Resource::ConfigMap && p.key == CM)
        .collect()
}

fn zone(p: &Patch) -> String {
    p.body["data"][KEY].as_str().unwrap_or_default().to_owned()
}

fn serial(z: &str) -> u32 {
    st8s::dns::serial_of(z).unwrap_or_default()
}

/// Waits (bounded) for a zone write after the first `seen` ones that satisfies `ok`.
fn wait_write(api: &ApiServer, dns: &Dns, seen: usize, secs: u64, ok: impl Fn(&str) -> bool) -> Patch {
    let deadline = Instant::now() + Duration::from_secs(secs);
    loop {
        if let Some(p) = zone_writes(api).into_iter().skip(seen).find(|p| ok(&zone(p))) {
            return p;
        }
        assert!(
            Instant::now() < deadline,
            "no such zone write within {secs}s; writes: {:#?}\nst8s dns log:\n{}",
            zone_writes(api).iter().map(zone).collect::<Vec<_>>(),
            dns.log()
        );
        std::thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn zones_follow_the_cluster_and_unready_nodes_leave_the_answers() {
    let api = ApiServer::start().expect("double");
    let kubeconfig = std::env::temp_dir().join(format!("st8s-dns-cluster-{}.kubeconfig", std::process::id()));
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    for (n, ip) in [
        ("node1", "10.77.0.11"),
        ("node2", "10.77.0.12"),
        ("node3", "10.77.0.13"),
    ] {
        api.apply(Resource::Node, node(n, ip, true));
        api.apply(Resource::Lease, lease(n, Duration::ZERO));
    }
    // Another component's Lease in the namespace is not an agent's.
    api.apply(
        Resource::Lease,
        json!({"metadata": {"name": "external-dns", "namespace": NS}, "spec": {"holderIdentity": "x"}}),
    );
    api.apply(
        Resource::Ingress,
        json!({"metadata": {"name": "jellyfin", "namespace": "media"},
               "spec": {"rules": [{"host": "jellyfin.home.example.org"}]}}),
    );
    api.apply(
        Resource::HttpRoute,
        json!({"metadata": {"name": "gotify", "namespace": "notify", "annotations": {"st8s.io/exposure": "wan"}},
               "spec": {"hostnames": ["gotify.home.example.org"]}}),
    );
    api.apply(
        Resource::Service,
        json!({"metadata": {"name": "ha", "namespace": "home",
                            "annotations": {"st8s.io/hostname": "ha.home.example.org", "st8s.io/exposure": "lan"}},
               "spec": {"ports": [{"port": 8123}]}}),
    );
    // `st8s.io/answer: backends`: only the node that runs Traefik (hostPort 443) answers.
    api.apply(
        Resource::Ingress,
        json!({"metadata": {"name": "photos", "namespace": "media", "annotations": {"st8s.io/answer": "backends"}},
               "spec": {"rules": [{"host": "photos.home.example.org"}]}}),
    );
    api.apply(
        Resource::Pod,
        json!({"metadata": {"name": "traefik-x", "namespace": "ingress"},
               "spec": {"nodeName": "node1", "containers": [{"name": "t", "ports": [{"containerPort": 8443, "hostPort": 443}]}]},
               "status": {"podIP": "10.42.0.9", "conditions": [{"type": "Ready", "status": "True"}]}}),
    );
    api.set_missing(Resource::IngressRoute, true);
    // deploy/base ships the ConfigMap empty, so that `st8s dns` only ever patches it.
    api.apply(
        Resource::ConfigMap,
        json!({"metadata": {"name": "st8s-zones", "namespace": NS}}),
    );

    let dns = Dns::start(&kubeconfig, "a");
    let first = wait_write(&api, &dns, 0, 20, |z| z.contains("jellyfin IN A 10.77.0.13"));
    assert_eq!(first.field_manager, "st8s", "server-side apply as st8s");
    let z = zone(&first);
    for ip in ["10.77.0.11", "10.77.0.12", "10.77.0.13"] {
        assert!(z.contains(&format!("jellyfin IN A {ip}")), "{z}");
        assert!(z.contains(&format!("ha IN A {ip}")), "{z}");
    }
    assert!(
        !z.contains("gotify"),
        "a WAN-only name never gets a LAN record: {z}"
    );
    assert!(z.contains("node1.lab IN A 10.77.0.11"), "node names: {z}");
    assert!(
        z.contains("photos IN A 10.77.0.11") && !z.contains("photos IN A 10.77.0.12"),
        "answer: backends lists the node running Traefik: {z}"
    );
    assert_eq!(serial(&z), 1);
    assert!(
        dns.log().contains("CRD not installed"),
        "a missing CRD is said once and tolerated:\n{}",
        dns.log()
    );

    // A node turns NotReady.
    let seen = zone_writes(&api).len();
    let t0 = Instant::now();
    api.apply(Resource::Node, node("node2", "10.77.0.12", false));
    let w = wait_write(&api, &dns, seen, 10, |z| !z.contains("jellyfin IN A 10.77.0.12"));
    let not_ready_ms = w.at.duration_since(t0).as_secs_f64() * 1e3;
    assert_eq!(serial(&zone(&w)), 2, "one change, one serial step");
    assert!(
        zone(&w).contains("node2.lab IN A 10.77.0.12"),
        "the node keeps its own name"
    );

    // An agent stops renewing: its Lease runs out about 1 s from now, with no event at all.
    let seen = zone_writes(&api).len();
    api.apply(Resource::Lease, lease("node3", Duration::from_secs(9)));
    let expiry = Instant::now() + Duration::from_secs(1);
    let w = wait_write(&api, &dns, seen, 10, |z| !z.contains("jellyfin IN A 10.77.0.13"));
    let lease_ms = w.at.saturating_duration_since(expiry).as_secs_f64() * 1e3;
    assert_eq!(serial(&zone(&w)), 3);
    assert!(zone(&w).contains("jellyfin IN A 10.77.0.11"));

    // Changes that do not touch the answers write nothing.
    let seen = zone_writes(&api).len();
    api.apply(
        Resource::Service,
        json!({"metadata": {"name": "plain", "namespace": "home"}, "spec": {"ports": [{"port": 80}]}}),
    );
    api.apply(Resource::Lease, lease("node1", Duration::ZERO));
    std::thread::sleep(Duration::from_millis(1500));
    assert_eq!(
        zone_writes(&api).len(),
        seen,
        "no write, no serial step, without a change"
    );

    // A restart continues the serial from the ConfigMap instead of starting again at 1.
    let stored = api.get(Resource::ConfigMap, CM).expect("the ConfigMap exists");
    let before = serial(stored["data"][KEY].as_str().unwrap_or_default());
    drop(dns);
    let dns = Dns::start(&kubeconfig, "b");
    let seen = zone_writes(&api).len();
    api.apply(Resource::Lease, lease("node2", Duration::ZERO));
    api.apply(Resource::Node, node("node2", "10.77.0.12", true));
    let w = wait_write(&api, &dns, seen, 20, |z| z.contains("jellyfin IN A 10.77.0.12"));
    assert_eq!(serial(&zone(&w)), before + 1, "{}", dns.log());
    drop(dns);
    let _ = std::fs::remove_file(&kubeconfig);

    // Every call it made is one that deploy/base's RBAC grants st8s-dns, and it made the
    // ones expected of it.
    let manifests =
        xtask::deploy::render(&xtask::deploy::deploy_dir().join("base")).expect("deploy/base renders");
    let calls = api.calls();
    for c in &calls {
        assert!(
            xtask::deploy::allowed(&manifests, NS, "st8s-dns", c),
            "deploy/base does not let st8s dns make {c:?}"
        );
    }
    for (verb, resource) in [
        ("watch", "nodes"),
        ("watch", "leases"),
        ("watch", "pods"),
        ("watch", "ingresses"),
        ("watch", "services"),
        ("watch", "httproutes"),
        ("list", "ingressroutes"),
        ("get", "configmaps"),
        ("patch", "configmaps"),
    ] {
        assert!(
            calls.iter().any(|c| c.verb == verb && c.resource == resource),
            "expected a {verb} of {resource} among {calls:?}"
        );
    }
    println!(
        "st8s dns, measured against the API double: node NotReady -> zone ConfigMap written in {not_ready_ms:.1} ms; agent Lease ran out -> written {lease_ms:.1} ms after the expiry"
    );
}

use xtask::http_status;

fn wait_status(port: u16, want: u16, secs: u64, dns: &Dns) {
    let deadline = Instant::now() + Duration::from_secs(secs);
    while http_status(port, "/readyz") != Some(want) {
        assert!(
            Instant::now() < deadline,
            "/readyz never said {want}: {:?}\n{}",
            http_status(port, "/readyz"),
            dns.log()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// Issue 14: `st8s dns` as a sidecar of a CoreDNS replica (no ConfigMap, a zone directory) says
/// through /readyz whether its zones are current: ready once written from a complete view, not
/// ready while its watches fail (an API outage), ready again after. The home example's readiness
/// probe on it takes a replica with stale zones out of the steered :53, so the others answer.
#[test]
fn a_sidecar_is_ready_only_while_its_zones_are_current() {
    let api = ApiServer::start().expect("double");
    let kubeconfig = std::env::temp_dir().join(format!("st8s-dns-sidecar-{}.kubeconfig", std::process::id()));
    api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
    api.apply(Resource::Node, node("node1", "10.77.0.11", true));
    api.apply(Resource::Lease, lease("node1", Duration::ZERO));
    api.apply(
        Resource::Ingress,
        json!({"metadata": {"name": "jellyfin", "namespace": "media"},
               "spec": {"rules": [{"host": "jellyfin.home.example.org"}]}}),
    );
    api.set_missing(Resource::IngressRoute, true);
    api.set_missing(Resource::HttpRoute, true);
    let dir = std::env::temp_dir().join(format!("st8s-dns-sidecar-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    let port = xtask::free_port();
    let listen = format!("127.0.0.1:{port}");
    let dns = Dns::start_with(
        &kubeconfig,
        "sidecar",
        &[
            "--configmap",
            "",
            "--zone-dir",
            dir.to_str().expect("utf-8"),
            "--listen",
            &listen,
        ],
    );
    wait_status(port, 200, 20, &dns);
    assert!(dir.join("jellyfin.home.example.org.zone").exists());
    // Issue 17: the zone changes are in its metrics, as a dashboard reads them.
    let (_, metrics) = xtask::http_get(port, "/metrics").expect("metrics");
    for line in [
        "st8s_dns_zone_writes_total{zone=\"jellyfin.home.example.org\"} 1",
        "st8s_dns_hostnames 1",
        "st8s_dns_serving_nodes 1",
        "st8s_dns_write_latency_seconds_count ",
        "st8s_ready 1",
    ] {
        assert!(metrics.contains(line), "{line} in:\n{metrics}");
    }
    let exported = xtask::exposition_series(&metrics);
    let dashboard = xtask::dashboard_queries(&xtask::dashboard_path()).expect("dashboard");
    let used: Vec<(String, String)> = dashboard
        .iter()
        .flat_map(|(panel, q)| {
            xtask::metric_names(q)
                .into_iter()
                .map(move |n| (panel.clone(), n))
        })
        .filter(|(_, n)| n.starts_with("st8s_dns_"))
        .collect();
    assert!(!used.is_empty(), "the dashboard shows st8s dns");
    for (panel, name) in used {
        assert!(
            exported.contains(&name),
            "panel {panel:?} uses {name}, which st8s dns does not export:\n{metrics}"
        );
    }
    assert!(
        api.patches().iter().all(|p| p.kind != Resource::ConfigMap),
        "no ConfigMap in this mode"
    );
    api.set_down(true);
    wait_status(port, 503, 20, &dns);
    api.set_down(false);
    wait_status(port, 200, 20, &dns);
    drop(dns);
    let _ = std::fs::remove_dir_all(&dir);
    let _ = std::fs::remove_file(&kubeconfig);
}
