//! `st8s dns` as a program: offline (a YAML file in, zone files out) or on a cluster, where it
//! watches the objects that name hostnames, the Nodes, the agents' Leases and the pods that hold
//! hostPorts (for `st8s.io/answer: backends`), and keeps one
//! ConfigMap (server-side apply, field manager `st8s`) with a zone file per domain, which CoreDNS
//! serves with its `file` plugin.
//!
//! One replica runs it (a Deployment with `replicas: 1` and the `Recreate` strategy). There is no
//! leader election: the ConfigMap write is idempotent, the zone's serial continues from what the
//! ConfigMap holds, and a gap of a few seconds between two replicas only delays an update,
//! since CoreDNS keeps serving the last zone it loaded.

use std::{
    collections::{BTreeMap, BTreeSet},
    path::{Path, PathBuf},
    sync::Arc,
    time::Duration,
};

use anyhow::Context as _;
use k8s_openapi::{
    api::{
        coordination::v1::Lease,
        core::v1::{ConfigMap, Node},
    },
    jiff::Timestamp,
};
use kube::{
    Api, Client,
    api::{Patch, PatchParams},
    runtime::reflector::Store,
};
use tokio::sync::mpsc;
use tracing::{info, warn};

use crate::{
    FIELD_MANAGER,
    core::keep_reachable,
    dns::{
        self, DnsConfig, Objects,
        objects::{self, NamesHosts, Route},
    },
    http::metrics::Metrics,
    sources::{
        kube::{self as kube_source, Msg, WatchStatus, WatchedPod, Watchers},
        probe::{PeerProbeArgs, Prober},
        resource::Resource,
    },
};

#[derive(clap::Args, Debug)]
pub struct DnsArgs {
    /// Render once from a YAML file (`kubectl get nodes,pods,ingress,httproutes,ingressroutes,services
    /// -A -o yaml`; pods only matter for `st8s.io/answer: backends`) instead of watching the
    /// cluster.
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
    /// A LAN domain to render (repeat for several).
    #[arg(long = "domain", value_name = "DOMAIN", required = true)]
    pub domains: Vec<String>,
    /// Zone file to write (one domain), or directory for `<domain>.zone` files (several).
    /// Required with --from-file; on a cluster the files are written next to the ConfigMap.
    #[arg(long, value_name = "PATH")]
    pub out: Option<PathBuf>,
    /// Write one zone per published name and per node name into DIR (`<name>.zone`), removing
    /// those no longer published: for a DNS server that loads a directory of zones and passes
    /// every other name on (CoreDNS `auto` + `forward`), so that names st8s does not publish, `wan`
    /// ones included, resolve upstream. With `--configmap ""` the only output (a sidecar of each
    /// CoreDNS replica, sharing the directory).
    #[arg(long, value_name = "DIR")]
    pub zone_dir: Option<PathBuf>,
    /// Serve /healthz, /readyz and /metrics here. /readyz answers 200 once the zones are written
    /// from a complete view, and only while every watch works and the last write did: a readiness
    /// probe on it keeps a CoreDNS replica whose zones are not current out of the steered :53.
    #[arg(long, value_name = "ADDR")]
    pub listen: Option<std::net::SocketAddr>,
    /// Give service names A records only, no AAAA (by default a serving node with an IPv6
    /// InternalIP gets an AAAA too: st8s steers IPv6 as it steers IPv4). For a cluster whose
    /// nodes run agents from before IPv6 steering. Node names always get their node's AAAA.
    #[arg(long)]
    pub no_service_aaaa: bool,
    /// Accepted for older manifests: service AAAA records are the default now.
    #[arg(long, hide = true)]
    pub service_aaaa: bool,
    /// Answer the `.local` hosts that the agents of this zone hear (`st8s agent --mdns`) as
    /// `<host>.<zone>.<domain>` (repeat for several zones). A node's own name and the names st8s
    /// publishes for services keep theirs.
    #[arg(long = "mdns-zone", value_name = "ZONE")]
    pub mdns_zones: Vec<String>,
    /// Node label naming a node's zone: `<node>.<zone>.<domain>`.
    #[arg(long, default_value = "st8s.io/zone")]
    pub zone_label: String,
    /// TTL of every record (short, so that a node leaving is noticed quickly).
    #[arg(long, default_value_t = 30)]
    pub ttl: u32,
    /// NS target of the zones (out of zone by default, so an empty zone stays valid).
    #[arg(long, default_value = "localhost.")]
    pub ns: String,
    /// Offline: count a node only while its agent's Lease (`st8s-agent-<node>`, include the
    /// Leases in the file) is fresh. On a cluster this is always so.
    #[arg(long)]
    pub agent_leases: bool,
    /// Namespace of the ConfigMap and of the agents' Leases.
    #[arg(long, env = "POD_NAMESPACE", default_value = "st8s-system")]
    pub namespace: String,
    /// The ConfigMap that holds the zones (`<domain>.db` keys). Empty: no ConfigMap, only the
    /// --out files (a sidecar of CoreDNS writing into a shared volume).
    #[arg(long, default_value = "st8s-zones")]
    pub configmap: String,
    /// Nodes are probed as the agents probe each other: a node that stays silent leaves the
    /// answers at once, before its Lease runs out (`--peer-probe-ms 0`: Leases alone).
    #[command(flatten)]
    pub peers: PeerProbeArgs,
}

impl DnsArgs {
    fn config(&self, agent_leases: bool) -> DnsConfig {
        DnsConfig {
            domains: self
                .domains
                .iter()
                .map(|d| d.trim_end_matches('.').to_ascii_lowercase())
                .collect(),
            zone_label: self.zone_label.clone(),
            ttl: self.ttl,
            ns: self.ns.clone(),
            agent_leases,
            service_aaaa: !self.no_service_aaaa,
            mdns_zones: self.mdns_zones.clone(),
        }
    }
}

pub async fn run(args: DnsArgs) -> anyhow::Result<()> {
    match &args.from_file {
        Some(path) => run_offline(&args, path),
        None => {
            let client = Client::try_default().await.context(
                "no Kubernetes API to watch (in-cluster config or kubeconfig); use --from-file offline",
            )?;
            run_cluster(&args, client).await
        }
    }
}

/// Where the zone of `domain` goes on disk, if anywhere.
fn zone_path(out: &Path, domains: &[String], domain: &str) -> PathBuf {
    if domains.len() == 1 {
        out.to_owned()
    } else {
        out.join(format!("{domain}.zone"))
    }
}

fn write_atomically(path: &Path, text: &str) -> anyhow::Result<()> {
    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let tmp = path.with_extension("tmp");
    std::fs::write(&tmp, text).with_context(|| format!("writing {}", tmp.display()))?;
    std::fs::rename(&tmp, path).with_context(|| format!("writing {}", path.display()))
}

fn run_offline(args: &DnsArgs, from: &Path) -> anyhow::Result<()> {
    let cfg = args.config(args.agent_leases);
    anyhow::ensure!(
        args.out.is_some() || args.zone_dir.is_some(),
        "--from-file needs --out or --zone-dir"
    );
    let text = std::fs::read_to_string(from).with_context(|| format!("reading {}", from.display()))?;
    let input = dns::collect_yaml(&text, &cfg, Timestamp::now())
        .with_context(|| format!("parsing {}", from.display()))?;
    for w in &input.warnings {
        warn!("{w}");
    }
    if let Some(dir) = &args.zone_dir {
        let synced = sync_zone_dir(dir, &input, &cfg)?;
        println!(
            "{}: {} zones, {} written, {} removed",
            dir.display(),
            synced.zones,
            synced.written.len(),
            synced.removed.len()
        );
    }
    let Some(out) = args.out.as_deref() else {
        return Ok(());
    };
    for domain in &cfg.domains {
        let path = zone_path(out, &cfg.domains, domain);
        let previous = std::fs::read_to_string(&path).ok();
        let (zone, changed) = dns::render_zone(&input, domain, &cfg, previous.as_deref());
        if changed {
            write_atomically(&path, &zone)?;
        }
        println!(
            "{domain}: serial {} ({}) -> {}",
            dns::serial_of(&zone).unwrap_or_default(),
            if changed { "changed" } else { "unchanged" },
            path.display()
        );
    }
    Ok(())
}

/// What one pass over the zone directory did.
#[derive(Debug, Default)]
struct Synced {
    zones: usize,
    written: Vec<String>,
    removed: Vec<String>,
}

/// Makes `dir` hold the per-name zones of `input` ([`dns::render_name_zones`]): writes the ones
/// that changed (atomically, serials continued from what is there) and removes the ones st8s
/// wrote that are no longer published. Files it did not write are left alone.
fn sync_zone_dir(dir: &Path, input: &dns::DnsInput, cfg: &DnsConfig) -> anyhow::Result<Synced> {
    std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    let mut previous = BTreeMap::new();
    for entry in std::fs::read_dir(dir).with_context(|| format!("reading {}", dir.display()))? {
        let path = entry?.path();
        let Some(origin) = path
            .file_name()
            .and_then(|n| n.to_str())
            .and_then(|n| n.strip_suffix(".zone"))
        else {
            continue;
        };
        if let Ok(text) = std::fs::read_to_string(&path)
            && text.starts_with(dns::HEADER)
        {
            previous.insert(origin.to_owned(), text);
        }
    }
    let next = dns::render_name_zones(input, cfg, &previous);
    let mut synced = Synced {
        zones: next.len(),
        ..Synced::default()
    };
    for (origin, (text, changed)) in &next {
        if *changed {
            write_atomically(&dir.join(format!("{origin}.zone")), text)?;
            synced.written.push(origin.clone());
        }
    }
    for origin in previous.keys().filter(|o| !next.contains_key(*o)) {
        let path = dir.join(format!("{origin}.zone"));
        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
        synced.removed.push(origin.clone());
    }
    Ok(synced)
}

/// The kinds of object `st8s dns` reads on a cluster.
pub const WATCHED: [Resource; 7] = [
    Resource::Node,
    Resource::Lease,
    Resource::Pod,
    Resource::Ingress,
    Resource::Service,
    Resource::HttpRoute,
    Resource::IngressRoute,
];

/// The stores the watchers of `st8s dns` keep.
#[derive(Clone)]
pub struct DnsStores {
    pub nodes: Store<Node>,
    pub leases: Store<Lease>,
    pub pods: Store<WatchedPod>,
    pub ingresses: Store<objects::Ingress>,
    pub services: Store<objects::Service>,
    pub http_routes: Store<objects::HttpRoute>,
    pub ingress_routes: Store<objects::IngressRoute>,
}

impl DnsStores {
    /// What the stores hold now, in a stable order; the stores of kinds the API does not serve
    /// are not read.
    pub fn objects(&self, status: &WatchStatus) -> Objects {
        fn read<K: kube::Resource<DynamicType = ()> + Clone>(store: &Store<K>) -> Vec<K> {
            store.state().iter().map(|k| K::clone(k)).collect()
        }
        fn routes<K: NamesHosts + Clone>(
            store: &Store<K>,
            status: &WatchStatus,
            kind: Resource,
        ) -> Vec<Route> {
            if status.absent(kind) {
                return Vec::new();
            }
            store.state().iter().map(|k| k.route()).collect()
        }
        let mut objects = Objects {
            nodes: read(&self.nodes),
            leases: read(&self.leases),
            pods: self.pods.state().iter().filter_map(|p| p.to_pod()).collect(),
            routes: [
                routes(&self.ingresses, status, Resource::Ingress),
                routes(&self.services, status, Resource::Service),
                routes(&self.http_routes, status, Resource::HttpRoute),
                routes(&self.ingress_routes, status, Resource::IngressRoute),
            ]
            .concat(),
        };
        objects
            .nodes
            .sort_by(|a, b| a.metadata.name.cmp(&b.metadata.name));
        objects.routes.sort_by(|a, b| a.object.cmp(&b.object));
        objects.pods.sort_by_key(|p| p.key());
        objects
    }
}

/// Starts one watcher per kind (Leases only in `lease_namespace`; Nodes keep their
/// `zone_label`); their messages arrive on the returned channel.
pub fn spawn_watchers(
    client: &Client,
    lease_namespace: &str,
    zone_label: &str,
) -> (DnsStores, mpsc::Receiver<Msg>) {
    let mut w = Watchers::new();
    let label = zone_label.to_owned();
    let stores = DnsStores {
        nodes: w.watch(Api::all(client.clone()), Resource::Node, move |n| {
            objects::slim_zone_node(&label, n)
        }),
        leases: w.watch(
            Api::namespaced(client.clone(), lease_namespace),
            Resource::Lease,
            objects::slim_lease,
        ),
        pods: w.watch(
            Api::all(client.clone()),
            Resource::Pod,
            kube_source::name_only_without_host_ports,
        ),
        ingresses: w.watch(Api::all(client.clone()), Resource::Ingress, |_| {}),
        services: w.watch(Api::all(client.clone()), Resource::Service, |_| {}),
        http_routes: w.watch(Api::all(client.clone()), Resource::HttpRoute, |_| {}),
        ingress_routes: w.watch(Api::all(client.clone()), Resource::IngressRoute, |_| {}),
    };
    (stores, w.start())
}

/// The ConfigMap key of a domain's zone.
pub fn zone_key(domain: &str) -> String {
    format!("{domain}.db")
}

async fn run_cluster(args: &DnsArgs, client: Client) -> anyhow::Result<()> {
    let cfg = args.config(true);
    let cms: Option<Api<ConfigMap>> =
        (!args.configmap.is_empty()).then(|| Api::namespaced(client.clone(), &args.namespace));
    anyhow::ensure!(
        cms.is_some() || args.out.is_some() || args.zone_dir.is_some(),
        "nowhere to write the zones: give --configmap, --out or --zone-dir"
    );
    let mut zones = previous_zones(args, &cfg, cms.as_ref()).await;
    info!(
        domains = ?cfg.domains,
        configmap = %format!("{}/{}", args.namespace, args.configmap),
        "watching nodes, agent leases, pods with hostPorts, ingresses, services, httproutes and ingressroutes"
    );
    let metrics = Arc::new(Metrics::for_dns());
    if let Some(addr) = args.listen {
        let m = metrics.clone();
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(addr, m).await {
                warn!(error = format!("{e:#}"), "health endpoint failed");
            }
        });
    }
    let mut dir_ok = true;
    let mut write_ok = cms.is_none();
    let (stores, mut rx) = spawn_watchers(&client, &args.namespace, &cfg.zone_label);
    let mut prober = Prober::start(&args.peers);
    let mut unreachable: std::collections::BTreeSet<std::net::Ipv4Addr> = Default::default();
    let mut probes_blind = false;
    let mut status = WatchStatus::default();
    let mut warned: BTreeSet<String> = BTreeSet::new();
    let mut written_once = false;
    let mut wake: Option<Timestamp> = None;
    loop {
        let until_wake = wake.map(|w| {
            let d = w.duration_since(Timestamp::now());
            Duration::from_millis(d.as_millis().clamp(0, 3_600_000) as u64)
        });
        let mut batch = Vec::new();
        tokio::select! {
            m = rx.recv() => match m {
                Some(m) => batch.push(m),
                None => anyhow::bail!("every watcher stopped"),
            },
            now_unreachable = prober.recv() => unreachable = now_unreachable,
            () = tokio::time::sleep(until_wake.unwrap_or(Duration::from_secs(3600))) => {}
        }
        while let Ok(m) = rx.try_recv() {
            batch.push(m);
        }
        let earliest = batch.iter().filter_map(kube_source::arrived).min();
        for msg in &batch {
            let effect = status.take(msg);
            kube_source::log_effect(msg, &effect, "the zones as last written");
        }
        if !status.synced(&WATCHED) {
            metrics.set_ready(false, Some("waiting for the first complete list"));
            continue;
        }
        let now = Timestamp::now();
        let mut input = dns::collect(&stores.objects(&status), &cfg, now);
        let addrs: Vec<std::net::Ipv4Addr> = input.nodes.iter().map(|n| n.addr).collect();
        prober.follow(addrs);
        let blind = drop_unreachable(&mut input, &unreachable);
        if blind != probes_blind {
            if blind {
                warn!(
                    port = args.peers.peer_port,
                    "no node answers probes: the Leases alone decide (is the port reachable?)"
                );
            } else {
                info!("nodes answer probes again");
            }
            probes_blind = blind;
        }
        wake = input.next_expiry;
        let serving = input.nodes.iter().filter(|n| n.serving).count();
        metrics.set_published(input.hosts.len(), serving);
        let fresh: BTreeSet<String> = input.warnings.iter().map(|w| w.to_string()).collect();
        for w in fresh.difference(&warned) {
            warn!("{w}");
        }
        warned = fresh;
        if let Some(dir) = &args.zone_dir {
            dir_ok = match sync_zone_dir(dir, &input, &cfg) {
                Ok(synced) => {
                    let latency = earliest.map(|t| t.elapsed());
                    metrics.zones_written(synced.written.iter().map(String::as_str), latency);
                    metrics.zones_removed(synced.removed.len());
                    if !synced.written.is_empty() || !synced.removed.is_empty() {
                        info!(
                            dir = %dir.display(),
                            written = ?synced.written,
                            removed = ?synced.removed,
                            latency_us = earliest.map(|t| t.elapsed().as_micros() as u64),
                            "zone directory written"
                        );
                    }
                    true
                }
                Err(e) => {
                    warn!(error = %format!("{e:#}"), "writing the zone directory failed; retrying in 2 s");
                    wake = Some(now + k8s_openapi::jiff::SignedDuration::from_secs(2));
                    false
                }
            };
        }
        let (next, changed) = render_all(&input, &cfg, &zones, written_once);
        if changed.is_empty() {
            report_ready(&metrics, &status, dir_ok, write_ok);
            continue;
        }
        let written = match &cms {
            Some(cms) => apply_configmap(cms, &args.configmap, &next).await,
            None => Ok(()),
        };
        write_ok = match written {
            Ok(()) => {
                written_once = true;
                zones = next;
                metrics.zones_written(changed.iter().map(String::as_str), earliest.map(|t| t.elapsed()));
                info!(
                    zones = %changed.join(", "),
                    hostnames = input.hosts.len(),
                    serving_nodes = serving,
                    latency_us = earliest.map(|t| t.elapsed().as_micros() as u64),
                    "zones written"
                );
                if let Some(out) = &args.out {
                    for domain in &cfg.domains {
                        if let Some(z) = zones.get(&zone_key(domain)) {
                            write_atomically(&zone_path(out, &cfg.domains, domain), z)?;
                        }
                    }
                }
                true
            }
            Err(e) => {
                warn!(error = %format!("{e:#}"), "writing the zones failed; retrying in 2 s");
                wake = Some(now + k8s_openapi::jiff::SignedDuration::from_secs(2));
                false
            }
        };
        report_ready(&metrics, &status, dir_ok, write_ok);
    }
}

/// Ready: every kind listed, no watch failing, and the last writes worked.
fn report_ready(metrics: &Metrics, status: &WatchStatus, dir_ok: bool, write_ok: bool) {
    let reason = match status.failing().next() {
        Some((kind, failure)) => Some(format!(
            "the watch of {kind} fails ({failure}); the zones may be stale"
        )),
        None if !dir_ok => Some("writing the zone directory failed".to_owned()),
        None if !write_ok => Some("writing the zones ConfigMap failed".to_owned()),
        None => None,
    };
    metrics.set_ready(reason.is_none(), reason.as_deref());
}

/// The zones as they were before this start, so that the serial continues across restarts: from
/// the ConfigMap, or the `--out` files.
async fn previous_zones(
    args: &DnsArgs,
    cfg: &DnsConfig,
    cms: Option<&Api<ConfigMap>>,
) -> BTreeMap<String, String> {
    let mut zones = BTreeMap::new();
    if let Some(out) = &args.out {
        for domain in &cfg.domains {
            if let Ok(z) = std::fs::read_to_string(zone_path(out, &cfg.domains, domain)) {
                zones.insert(zone_key(domain), z);
            }
        }
    }
    if let Some(cms) = cms {
        match cms.get_opt(&args.configmap).await {
            Ok(cm) => zones.extend(cm.and_then(|c| c.data).unwrap_or_default()),
            Err(e) => {
                warn!(error = %e, "cannot read ConfigMap {}/{}; zones start at serial 1", args.namespace, args.configmap);
            }
        }
    }
    zones
}

/// Unreachable nodes stop serving, as the agents' backends do, by the same panic-mode rule
/// ([`keep_reachable`]). Returns whether the probes are blind (no node at all answers).
fn drop_unreachable(input: &mut dns::DnsInput, unreachable: &BTreeSet<std::net::Ipv4Addr>) -> bool {
    let mut serving: Vec<std::net::Ipv4Addr> =
        input.nodes.iter().filter(|n| n.serving).map(|n| n.addr).collect();
    keep_reachable(&mut serving, |a| !unreachable.contains(a));
    for n in &mut input.nodes {
        n.serving &= serving.contains(&n.addr);
    }
    !unreachable.is_empty() && input.nodes.iter().all(|n| unreachable.contains(&n.addr))
}

/// Every domain's zone from `input`, and which of them changed (all of them before the first
/// write).
fn render_all(
    input: &dns::DnsInput,
    cfg: &DnsConfig,
    zones: &BTreeMap<String, String>,
    written_once: bool,
) -> (BTreeMap<String, String>, Vec<String>) {
    let mut next = BTreeMap::new();
    let mut changed = Vec::new();
    for domain in &cfg.domains {
        let key = zone_key(domain);
        let (zone, ch) = dns::render_zone(input, domain, cfg, zones.get(&key).map(String::as_str));
        if ch || !written_once {
            changed.push(format!(
                "{domain} serial {}",
                dns::serial_of(&zone).unwrap_or_default()
            ));
        }
        next.insert(key, zone);
    }
    (next, changed)
}

async fn apply_configmap(
    cms: &Api<ConfigMap>,
    name: &str,
    zones: &BTreeMap<String, String>,
) -> anyhow::Result<()> {
    let cm = serde_json::json!({
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {
            "name": name,
            "labels": {"app.kubernetes.io/name": "st8s", "app.kubernetes.io/component": "dns"},
        },
        "data": zones,
    });
    cms.patch(
        name,
        &PatchParams::apply(FIELD_MANAGER).force(),
        &Patch::Apply(&cm),
    )
    .await
    .with_context(|| format!("server-side apply of ConfigMap {name}"))?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::dns::{DnsInput, ZoneNode};

    #[derive(clap::Parser)]
    struct Cli {
        #[command(flatten)]
        dns: DnsArgs,
    }

    /// Service names get AAAA records unless told not to; the old opt-in flag still parses.
    #[test]
    fn service_aaaa_is_on_by_default_and_can_be_turned_off() {
        use clap::Parser as _;
        let parse = |extra: &[&str]| {
            let mut argv = vec!["st8s-dns", "--domain", "home.example.org"];
            argv.extend_from_slice(extra);
            Cli::try_parse_from(argv)
                .expect("parses")
                .dns
                .config(true)
                .service_aaaa
        };
        assert!(parse(&[]));
        assert!(parse(&["--service-aaaa"]));
        assert!(!parse(&["--no-service-aaaa"]));
    }

    fn input() -> DnsInput {
        let node = |name: &str, addr: &str, serving| ZoneNode {
            name: name.into(),
            addr: addr.parse().expect("ip"),
            addr6: None,
            zone: None,
            serving,
        };
        DnsInput {
            nodes: vec![
                node("a", "10.0.0.1", true),
                node("b", "10.0.0.2", true),
                node("c", "10.0.0.3", false),
            ],
            ..DnsInput::default()
        }
    }

    fn serving(i: &DnsInput) -> Vec<&str> {
        i.nodes
            .iter()
            .filter(|n| n.serving)
            .map(|n| n.name.as_str())
            .collect()
    }

    #[test]
    fn silent_nodes_leave_the_answers_unless_every_serving_node_is_silent() {
        let ips = |s: &[&str]| -> BTreeSet<std::net::Ipv4Addr> {
            s.iter().map(|a| a.parse().expect("ip")).collect()
        };
        let mut i = input();
        assert!(!drop_unreachable(&mut i, &ips(&["10.0.0.2"])));
        assert_eq!(serving(&i), ["a"]);
        let mut i = input();
        assert!(
            !drop_unreachable(&mut i, &ips(&["10.0.0.1", "10.0.0.2"])),
            "c still answers probes"
        );
        assert_eq!(
            serving(&i),
            ["a", "b"],
            "panic mode: no serving node answers, all stay"
        );
        let mut i = input();
        assert!(drop_unreachable(
            &mut i,
            &ips(&["10.0.0.1", "10.0.0.2", "10.0.0.3"])
        ));
        assert_eq!(serving(&i), ["a", "b"]);
    }
}
