//! `st8s agent`: keeps this node's dataplane in step with the cluster.

use std::{
    collections::BTreeMap,
    net::Ipv4Addr,
    path::PathBuf,
    sync::Arc,
    time::{Duration, Instant},
};

use anyhow::Context as _;
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, info_span, warn};

use crate::{
    dataplane::{Dataplane, Options, XdpChoice},
    http::Metrics,
    model::Cluster,
    net,
    plan::{Desired, plan},
    source::FileSource,
};

#[derive(Clone, Debug, clap::Args)]
pub struct AgentArgs {
    /// This node's name, as in the cluster (in a DaemonSet: from the downward API).
    #[arg(long, env = "NODE_NAME")]
    pub node: String,
    /// Read Nodes and Pods from this YAML file (`kubectl get nodes,pods -A -o yaml`) and follow
    /// its changes, instead of the Kubernetes API.
    #[arg(long, value_name = "PATH")]
    pub from_file: PathBuf,
    /// The uplink to attach to. Default: the interface that holds the node's InternalIP.
    #[arg(long, value_name = "IFACE")]
    pub iface: Option<String>,
    /// Where the maps are pinned while the agent runs.
    #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/st8s")]
    pub pin_dir: PathBuf,
    /// XDP on the uplink: `auto` uses native XDP when the driver has it and TC alone otherwise.
    #[arg(long, value_enum, default_value = "auto")]
    pub xdp: XdpChoice,
    /// Send new flows to this node's own backend pod when it has one (otherwise Maglev spreads
    /// them over all backends).
    #[arg(long, default_value_t = true, action = clap::ArgAction::Set)]
    pub prefer_local: bool,
    /// Flow-hash seed. Must be the same on every node.
    #[arg(long, default_value_t = 0x5717_8500)]
    pub hash_seed: u32,
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
}

/// The last cluster that planned cleanly, and what it planned.
struct Good {
    desired: Desired,
}

/// Plans `cluster` strictly: any problem with an object rejects the whole update, so that the
/// last good state stays programmed (the file is one unit the operator edits at once).
fn plan_strict(cluster: &Cluster, node: &str) -> Result<Desired, Vec<String>> {
    match plan(cluster, node) {
        Err(e) => Err(vec![e.to_string()]),
        Ok(p) if !p.problems.is_empty() => Err(p.problems.iter().map(|p| p.to_string()).collect()),
        Ok(p) => Ok(p.desired),
    }
}

/// Current MACs of the other nodes; asks the kernel to resolve the ones it does not know yet.
fn peer_macs(desired: &Desired) -> BTreeMap<Ipv4Addr, [u8; 6]> {
    let known = net::neighbours().unwrap_or_else(|e| {
        warn!(error = %e, "cannot read the neighbour table");
        BTreeMap::new()
    });
    let mut out = BTreeMap::new();
    for addr in desired.nodes.keys().filter(|a| **a != desired.self_node.addr) {
        match known.get(addr) {
            Some(mac) => {
                out.insert(*addr, *mac);
            }
            None => net::solicit(*addr),
        }
    }
    out
}

pub async fn run(args: AgentArgs) -> anyhow::Result<()> {
    let metrics = Arc::new(Metrics::default());
    metrics.set_ready(false, Some("starting"));
    {
        let (m, dir, addr) = (metrics.clone(), args.pin_dir.clone(), args.listen);
        tokio::spawn(async move {
            if let Err(e) = crate::http::serve(addr, m, dir).await {
                error!(error = format!("{e:#}"), "health and metrics endpoint failed");
            }
        });
    }
    let mut source = FileSource::new(&args.from_file);
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
    let iface = match &args.iface {
        Some(i) => i.clone(),
        None => net::iface_with_addr(desired.self_node.addr).with_context(|| {
            format!(
                "finding the uplink of node {} (pass --iface)",
                desired.self_node.name
            )
        })?,
    };
    info!(node = %args.node, addr = %desired.self_node.addr, %iface, "starting");
    let (mut dp, fates) = Dataplane::load(Options {
        iface: iface.clone(),
        pin_dir: args.pin_dir.clone(),
        xdp: args.xdp,
        prefer_local: args.prefer_local,
        hash_seed: args.hash_seed,
    })?;
    let adopted = fates.iter().all(|(_, f)| *f == crate::pins::MapFate::Adopted);
    info!(mac = %dp.self_mac(), adopted, "programs loaded");

    let mut good = Good { desired };
    let mut macs = peer_macs(&good.desired);
    // Program the table first, attach second: new programs never see an empty table, and an
    // adopted dataplane keeps forwarding with its old programs until the swap.
    let started = Instant::now();
    sync(&mut dp, &good.desired, &macs, "initial")?;
    dp.attach()?;
    metrics.observe_sync(started.elapsed());
    metrics.set_ready(true, None);
    info!(xdp_forwards = dp.xdp_forwards(), "dataplane attached; ready");

    let mut term = signal(SignalKind::terminate()).context("installing the SIGTERM handler")?;
    let mut int = signal(SignalKind::interrupt()).context("installing the SIGINT handler")?;
    let mut tick = tokio::time::interval(Duration::from_millis(args.poll_ms.max(50)));
    // Set when the maps lag behind the desired state; cleared only by a successful sync, so a
    // failed write is retried on the next tick.
    let mut dirty = false;
    // The last problem reported, so that a file that stays broken is reported once, not per tick.
    let mut last_problem: Option<String> = None;
    loop {
        tokio::select! {
            _ = term.recv() => { info!("SIGTERM"); break; }
            _ = int.recv() => { info!("SIGINT"); break; }
            _ = tick.tick() => {
                let seen = Instant::now();
                let problem = match source.poll() {
                    Ok(None) => None,
                    Ok(Some(cluster)) => match plan_strict(&cluster, &args.node) {
                        Ok(desired) => {
                            dirty |= desired != good.desired;
                            good.desired = desired;
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
                    metrics.error("bad_update");
                    last_problem = Some(p);
                }
                let new_macs = peer_macs(&good.desired);
                if new_macs != macs {
                    macs = new_macs;
                    dirty = true;
                }
                if dirty {
                    match sync(&mut dp, &good.desired, &macs, "update") {
                        Ok(()) => {
                            dirty = false;
                            metrics.observe_sync(seen.elapsed());
                        }
                        Err(e) => {
                            metrics.error("map_write");
                            error!(error = format!("{e:#}"), "programming the maps failed; retrying");
                        }
                    }
                }
            }
        }
    }
    drop(dp);
    if args.cleanup_on_exit {
        let removed = crate::pins::uninstall(&args.pin_dir)?;
        info!(pins = removed.len(), "dataplane detached and unpinned");
    } else {
        info!(pin_dir = %args.pin_dir.display(), "stopped; the dataplane keeps running (`st8s uninstall` removes it)");
    }
    Ok(())
}

fn sync(
    dp: &mut Dataplane,
    desired: &Desired,
    macs: &BTreeMap<Ipv4Addr, [u8; 6]>,
    why: &str,
) -> anyhow::Result<()> {
    let span = info_span!(
        "sync",
        why,
        ports = desired.ports.len(),
        nodes = desired.nodes.len()
    );
    let _g = span.enter();
    let report = dp.apply(desired, macs)?;
    if !report.unresolved.is_empty() {
        warn!(nodes = ?report.unresolved, "MAC of these nodes not resolved yet: not forwarding to them");
    }
    info!(
        writes = report.writes,
        ports_changed = report.ports_changed,
        "maps in sync"
    );
    Ok(())
}
