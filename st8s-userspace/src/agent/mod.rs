//! `st8s agent`: keeps this node's dataplane in step with the cluster.
//!
//! The source is the Kubernetes API (watchers, the default) or a YAML file (`--from-file`).
//! Either feeds the pure core ([`plan`]); one owner ([`Runner`]) holds the dataplane and applies
//! what changed. The dataplane is programmed before it is attached, and readiness is reported
//! only once the first full sync is in the maps.
//!
//! The loops ([`run_kube`], [`run_file`]) reach the kernel only through a [`Host`], so that their
//! logic (sync, retries, draining, settling, failover) is tested with a recording dataplane and
//! the API-server double, without root.

mod lease;
pub mod mdns;
mod runner;

use std::{
    collections::BTreeSet,
    future::Future,
    path::{Path, PathBuf},
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
pub use runner::Runner;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

use crate::{
    core::{Cluster, Desired, plan},
    dataplane::{CgroupChoice, Host, KernelHost, TcChoice, XdpChoice, pins},
    http::{ErrorKind, Metrics},
    sources::{
        file::FileSource,
        kube::{self as kube_source, KubeState},
        probe::{PeerProbeArgs, Prober},
    },
};

#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name, as in the cluster (in a DaemonSet: from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Read Nodes and Pods from this YAML file (`kubectl get nodes,pods -A -o yaml`) and follow
    /// its changes, instead of watching the Kubernetes API (in-cluster config or KUBECONFIG).
    #[arg(long, value_name = "PATH")]
    pub from_file: Option<PathBuf>,
    /// The uplink to attach to. Default: the interface that holds the node's InternalIP.
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,
    /// Where maps and links are pinned; they outlive the agent.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/st8s")]
    pub pin_dir: PathBuf,
    /// XDP on the uplink: `auto` uses native XDP when the driver has it and TC alone otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp: XdpChoice,
    /// TC programs: `auto` uses TCX links on kernels that have them (6.6 and later) and netlink
    /// filters (clsact, cls_bpf; Debian 12's 6.1, Ubuntu 22.04's 5.15) before. Either way a
    /// restarted agent replaces its programs in place.
    #[arg(long = "tc-attach", value_enum, default_value = "auto")]
    pub tc: TcChoice,
    /// Send new flows to this node's own backend pod when it has one (otherwise Maglev spreads
    /// them over all backends).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefer_local: bool,
    /// Flow-hash seed. Must be the same on every node.
    #[arg(long, default_value_t = 0x5717_8500)]
    pub hash_seed: u32,
    /// Where clients on the node itself (its processes and pods) are steered: the cgroup v2
    /// directory whose sockets the hooks see. `auto`: the cgroup v2 hierarchy this process sees
    /// mounted (in a DaemonSet, mount the host's /sys/fs/cgroup and pass its path); `off`: not
    /// steered.
    #[arg(long, value_name = "PATH|auto|off", default_value = "auto")]
    pub cgroup: CgroupChoice,
    /// On exit, detach the programs and remove the pins (by default the dataplane keeps running
    /// without the agent, so that upgrades and crashes never stop traffic).
    #[arg(long)]
    pub cleanup_on_exit: bool,
    /// Address for /healthz, /readyz and /metrics.
    #[arg(long, value_name = "ADDR", default_value = "0.0.0.0:9470")]
    pub listen: std::net::SocketAddr,
    /// How often to look at the source file and at peer MAC addresses.
    #[arg(long, value_name = "MS", default_value_t = 500)]
    pub poll_ms: u64,
    /// Namespace of this agent's Lease (`st8s-agent-<node>`), which it renews while it is ready
    /// and which `st8s dns` reads (watching the Kubernetes API only).
    #[arg(long, env = "POD_NAMESPACE", default_value = "st8s-system")]
    pub lease_namespace: String,
    /// Lease duration; the agent renews at a third of it. 0: no Lease.
    #[arg(long, value_name = "SECONDS", default_value_t = 10)]
    pub lease_seconds: u32,
    #[command(flatten)]
    pub peers: PeerProbeArgs,
    /// A backend on another node that just became active takes no new flow for this long, so
    /// that its own node has programmed its pod first (agents see changes at slightly different
    /// times).
    #[arg(long, value_name = "MS", default_value_t = 300)]
    pub settle_ms: u64,
    /// Listen for mDNS on the uplink and publish the `.local` hosts heard there (addresses on the
    /// uplink's subnets only) on this agent's Lease, for `st8s dns --mdns-zone`. Never answers
    /// mDNS itself. Needs the Kubernetes API (the Lease) and port 5353 shared with any avahi.
    #[arg(long)]
    pub mdns: bool,
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::new(Some(args.pin_dir.clone())));
    {
        let (m, addr) = (metrics.clone(), args.listen);
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(addr, m).await {
                error!(error = format!("{e:#}"), "health and metrics endpoint failed");
            }
        });
    }
    let host = KernelHost {
        iface: args.iface.clone(),
        pin_dir: args.pin_dir.clone(),
        xdp: args.xdp,
        prefer_local: args.prefer_local,
        hash_seed: args.hash_seed,
        cgroup: args.cgroup.clone(),
        tc: args.tc,
    };
    let prober = Prober::start(&args.peers);
    let mut signals = Signals::new()?;
    let shutdown = async move { signals.recv().await };
    let dataplane = match &args.from_file {
        Some(path) => run_file(&args, path, host, prober, metrics, shutdown).await?,
        None => {
            let client = kube::Client::try_default()
                .await
                .context("connecting to the Kubernetes API (in-cluster config or KUBECONFIG)")?;
            run_kube(&args, client, host, prober, metrics, shutdown).await?
        }
    };
    // The programs and maps are closed before their pins are removed.
    drop(dataplane);
    if args.cleanup_on_exit {
        let removed = pins::uninstall(&args.pin_dir)?;
        info!(pins = removed.len(), "dataplane detached and unpinned");
    } else {
        info!(pin_dir = %args.pin_dir.display(), "stopped; the dataplane keeps running (`st8s uninstall` removes it)");
    }
    Ok(())
}

struct Signals {
    term: tokio::signal::unix::Signal,
    int: tokio::signal::unix::Signal,
}

impl Signals {
    fn new() -> anyhow::Result<Self> {
        Ok(Signals {
            term: signal(SignalKind::terminate()).context("installing the SIGTERM handler")?,
            int: signal(SignalKind::interrupt()).context("installing the SIGINT handler")?,
        })
    }

    async fn recv(&mut self) {
        tokio::select! {
            _ = self.term.recv() => info!("SIGTERM"),
            _ = self.int.recv() => info!("SIGINT"),
        }
    }
}

/// Plans strictly: any problem with an object rejects the whole update, so that the last good
/// state stays programmed (the file is one unit the operator edits at once).
fn plan_strict(cluster: &Cluster, node: &str) -> Result<Desired, Vec<String>> {
    match plan(cluster, node) {
        Err(e) => Err(vec![e.to_string()]),
        Ok(p) if !p.problems.is_empty() => Err(p.problems.iter().map(|p| p.to_string()).collect()),
        Ok(p) => Ok(p.desired),
    }
}

/// The agent's loop over a cluster file, until `shutdown` resolves; returns the dataplane it
/// programmed.
pub async fn run_file<H: Host>(
    args: &AgentArgs,
    path: &Path,
    mut host: H,
    mut probing: Prober,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Option<H::Dataplane>> {
    if args.mdns {
        warn!(
            "--mdns publishes on the agent's Lease, which needs the Kubernetes API; not listening with --from-file"
        );
    }
    let mut source = FileSource::new(path);
    let since = Instant::now();
    let cluster = source
        .poll()
        .context("reading the cluster file")?
        .context("the cluster file is empty")?;
    let desired = plan_strict(&cluster, &args.node).map_err(|problems| {
        anyhow::anyhow!(
            "the cluster file cannot be programmed:\n  {}",
            problems.join("\n  ")
        )
    })?;
    metrics.set_objects("node", cluster.nodes.len());
    metrics.set_objects("pod", cluster.pods.len());
    let mut runner = Runner::start(&mut host, desired, settle(args), metrics.clone(), since)?;
    metrics.set_ready(true, None);
    info!("ready");
    probing.follow(runner.peers());

    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_ms.max(50)));
    // The last problem reported, so that a file that stays broken is reported once, not per tick.
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            unreachable = probing.recv() => {
                runner.set_unreachable(unreachable, Instant::now());
                runner.sync_logged("peer probe");
            }
            _ = tick.tick() => {
                let seen = Instant::now();
                let problem = match source.poll() {
                    Ok(None) => None,
                    Ok(Some(cluster)) => match plan_strict(&cluster, &args.node) {
                        Ok(desired) => {
                            metrics.set_objects("node", cluster.nodes.len());
                            metrics.set_objects("pod", cluster.pods.len());
                            runner.set_desired(desired, seen);
                            last_problem = None;
                            None
                        }
                        Err(problems) => Some(problems.join("; ")),
                    },
                    Err(e) => Some(format!("{:#}", anyhow::Error::from(e))),
                };
                if let Some(p) = problem
                    && last_problem.as_ref() != Some(&p)
                {
                    for line in p.split("; ") {
                        error!(file = %source.path().display(), problem = %line, "update rejected; the last good state stays programmed");
                    }
                    metrics.error(ErrorKind::BadUpdate);
                    last_problem = Some(p);
                }
                probing.follow(runner.peers());
                runner.refresh_macs(&mut host);
                runner.sync_logged("update");
            }
        }
    }
    Ok(Some(runner.into_dataplane()))
}

/// Plans leniently (the API serves objects one by one): objects with problems are left out with
/// one warning each, the rest is applied.
fn plan_lenient(cluster: &Cluster, node: &str, warned: &mut BTreeSet<String>) -> Result<Desired, String> {
    let p = plan(cluster, node).map_err(|e| e.to_string())?;
    let now: BTreeSet<String> = p.problems.iter().map(|p| p.to_string()).collect();
    for problem in now.difference(warned) {
        warn!(%problem, "object skipped");
    }
    *warned = now;
    Ok(p.desired)
}

/// The agent's loop over the Kubernetes API, until `shutdown` resolves; returns the dataplane
/// it programmed, if it got that far.
pub async fn run_kube<H: Host>(
    args: &AgentArgs,
    client: kube::Client,
    mut host: H,
    mut probing: Prober,
    metrics: Arc<Metrics>,
    shutdown: impl Future<Output = ()>,
) -> anyhow::Result<Option<H::Dataplane>> {
    let (stores, mut rx) = kube_source::spawn_watchers(client.clone());
    let (heard_tx, heard) = tokio::sync::watch::channel(mdns::Heard::new());
    let mut mdns_tx = args.mdns.then_some(heard_tx);
    if args.lease_seconds > 0 {
        lease::spawn_renewer(client, args, metrics.clone(), args.mdns.then_some(heard));
    } else if args.mdns {
        warn!("--mdns without a Lease (--lease-seconds 0): nothing would publish the hosts; not listening");
        mdns_tx = None;
    }
    let mut state = KubeState::new(stores);
    let mut runner: Option<Runner<H::Dataplane>> = None;
    let mut warned = BTreeSet::new();
    let mut plan_error: Option<String> = None;
    tokio::pin!(shutdown);
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_ms.max(50)));
    let mut first_event: Option<Instant> = None;
    loop {
        tokio::select! {
            () = &mut shutdown => break,
            unreachable = probing.recv() => {
                if let Some(r) = runner.as_mut() {
                    r.set_unreachable(unreachable, Instant::now());
                    r.sync_logged("peer probe");
                }
            }
            msg = rx.recv() => {
                let Some(msg) = msg else { anyhow::bail!("the watchers stopped") };
                first_event.get_or_insert_with(Instant::now);
                // Take everything that is already queued: one plan and one sync per burst.
                let mut batch = vec![msg];
                while batch.len() < 4096 {
                    match rx.try_recv() {
                        Ok(m) => batch.push(m),
                        Err(_) => break,
                    }
                }
                let earliest = batch.iter().filter_map(kube_source::arrived).min();
                for msg in batch {
                    if let kube_source::Msg::Failed { failure, .. } = &msg {
                        metrics.error(ErrorKind::Watch(*failure));
                    }
                    let effect = state.take(&msg);
                    kube_source::log_effect(&msg, &effect, "the last programmed state");
                }
                // The stores are read once per burst.
                let changed = state.refresh();
                if state.synced() {
                    start_mdns(args, &state.cluster, &mut mdns_tx);
                }
                metrics.set_objects("node", state.cluster.nodes.len());
                metrics.set_objects("pod", state.cluster.pods.len());
                if changed && state.synced() {
                    let since = earliest.unwrap_or_else(Instant::now);
                    match plan_lenient(&state.cluster, &args.node, &mut warned) {
                        Ok(desired) => {
                            plan_error = None;
                            match runner.as_mut() {
                                Some(r) => {
                                    r.set_desired(desired, since);
                                    r.sync_logged("watch");
                                }
                                None => {
                                    if let Some(first) = first_event {
                                        metrics.initial_list_seconds.set(first.elapsed().as_secs_f64());
                                    }
                                    runner = Some(Runner::start(&mut host, desired, settle(args), metrics.clone(), since)?);
                                }
                            }
                        }
                        Err(e) => {
                            if plan_error.as_ref() != Some(&e) {
                                error!(error = %e, "cannot program this node; the last programmed state stays");
                                metrics.error(ErrorKind::Plan);
                                plan_error = Some(e);
                            }
                        }
                    }
                }
                if let Some(r) = &runner {
                    probing.follow(r.peers());
                }
                report_readiness(&metrics, &state, runner.is_some(), plan_error.as_deref());
            }
            _ = tick.tick() => {
                if let Some(r) = runner.as_mut() {
                    r.refresh_macs(&mut host);
                    r.sync_logged("retry");
                }
            }
        }
    }
    Ok(runner.map(Runner::into_dataplane))
}

/// Starts the mDNS listener once, on the uplink: `--iface`, or the interface that holds this
/// node's InternalIP.
fn start_mdns(args: &AgentArgs, cluster: &Cluster, tx: &mut Option<tokio::sync::watch::Sender<mdns::Heard>>) {
    let iface = match &args.iface {
        Some(i) => Ok(i.clone()),
        None => match cluster.nodes.get(&args.node).and_then(|n| n.addr) {
            Some(addr) => crate::dataplane::net::iface_with_addr(addr).map_err(|e| e.to_string()),
            None => Err(format!("node {} has no InternalIP", args.node)),
        },
    };
    let Some(sender) = tx.take() else { return };
    match iface {
        Ok(iface) => mdns::spawn(iface, sender),
        Err(e) => warn!(error = %e, "no uplink to listen for mDNS on"),
    }
}

fn settle(args: &AgentArgs) -> Duration {
    Duration::from_millis(args.settle_ms)
}

fn report_readiness(metrics: &Metrics, state: &KubeState, programmed: bool, plan_error: Option<&str>) {
    let reason = if !state.synced() {
        Some("initial list of nodes and pods not complete".to_owned())
    } else if let Some((kind, err)) = state.failing().next() {
        Some(format!("watch of {kind} failing: {err}"))
    } else if let Some(e) = plan_error {
        Some(e.to_owned())
    } else if !programmed {
        Some("dataplane not programmed yet".to_owned())
    } else {
        None
    };
    if metrics.is_ready() != reason.is_none() {
        match &reason {
            None => info!("ready"),
            Some(r) => warn!(reason = %r, "not ready"),
        }
    }
    metrics.set_ready(reason.is_none(), reason.as_deref());
}
