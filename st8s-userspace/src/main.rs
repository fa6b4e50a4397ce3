//! `st8s`: the eBPF/XDP traffic-steering agent for small Kubernetes clusters.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use st8s::{agent, inspect, model::Cluster, plan};
use tracing_subscriber::EnvFilter;

#[derive(Parser)]
#[command(
    name = "st8s",
    version,
    about = "Kernel-side steering of hostPorts: every node answers on every port"
)]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Load and attach the dataplane on this node and keep its maps in sync with the cluster.
    Agent(agent::AgentArgs),
    /// Print the live steering table, flows and counters from the pinned maps.
    Inspect {
        /// The pin directory of the agent to inspect.
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/st8s")]
        pin_dir: PathBuf,
        /// Flows to show at most.
        #[arg(long, default_value_t = 20)]
        flows: usize,
    },
    /// Detach the programs and remove every pin (stop the agent first).
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/st8s")]
        pin_dir: PathBuf,
    },
    /// Render the LAN zone(s) for CoreDNS from Ingresses, HTTPRoutes, Traefik IngressRoutes,
    /// annotated Services and Nodes (offline, from a YAML file).
    Dns {
        /// Objects as `kubectl get nodes,ingress,httproutes,ingressroutes,services -A -o yaml`.
        #[arg(long, value_name = "PATH")]
        from_file: PathBuf,
        /// A LAN domain to render (repeat for several).
        #[arg(long = "domain", value_name = "DOMAIN", required = true)]
        domains: Vec<String>,
        /// Zone file to write (one domain), or directory for `<domain>.zone` files (several).
        #[arg(long, value_name = "PATH")]
        out: PathBuf,
        /// Node label naming a node's zone: `<node>.<zone>.<domain>`.
        #[arg(long, default_value = "st8s.io/zone")]
        zone_label: String,
        /// TTL of every record (short, so that a node leaving is noticed quickly).
        #[arg(long, default_value_t = 30)]
        ttl: u32,
        /// NS target of the zones (out of zone by default, so an empty zone stays valid).
        #[arg(long, default_value = "localhost.")]
        ns: String,
    },
    /// Print the steering table a node would get from a cluster file, without touching the kernel.
    Plan {
        #[arg(long)]
        node: String,
        #[arg(long, value_name = "PATH")]
        from_file: PathBuf,
    },
}

fn main() -> anyhow::Result<()> {
    tracing_subscriber::fmt()
        .with_env_filter(EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new("info")))
        .with_writer(std::io::stderr)
        .with_ansi(std::io::IsTerminal::is_terminal(&std::io::stderr()))
        .init();
    let cli = Cli::parse();
    match cli.command {
        Command::Agent(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(agent::run(args)),
        Command::Inspect { pin_dir, flows } => {
            let s = inspect::snapshot(&pin_dir)?;
            print!("{}", inspect::render(&s, flows));
            Ok(())
        }
        Command::Uninstall { pin_dir } => {
            let removed = st8s::pins::uninstall(&pin_dir)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", pin_dir.display());
            }
            for p in removed {
                println!("removed {p}");
            }
            Ok(())
        }
        Command::Dns {
            from_file,
            domains,
            out,
            zone_label,
            ttl,
            ns,
        } => {
            let cfg = st8s::dns::DnsConfig {
                domains: domains.clone(),
                zone_label,
                ttl,
                ns,
            };
            let text = std::fs::read_to_string(&from_file)
                .with_context(|| format!("reading {}", from_file.display()))?;
            let input = st8s::dns::collect(&text, &cfg)
                .with_context(|| format!("parsing {}", from_file.display()))?;
            for w in &input.warnings {
                tracing::warn!("{w}");
            }
            for domain in &domains {
                let path = if domains.len() == 1 {
                    out.clone()
                } else {
                    out.join(format!("{domain}.zone"))
                };
                let previous = std::fs::read_to_string(&path).ok();
                let (zone, changed) = st8s::dns::render_zone(&input, domain, &cfg, previous.as_deref());
                if changed {
                    if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
                        std::fs::create_dir_all(dir)
                            .with_context(|| format!("creating {}", dir.display()))?;
                    }
                    let tmp = path.with_extension("tmp");
                    std::fs::write(&tmp, &zone).with_context(|| format!("writing {}", tmp.display()))?;
                    std::fs::rename(&tmp, &path).with_context(|| format!("writing {}", path.display()))?;
                }
                println!(
                    "{domain}: serial {} ({}) -> {}",
                    st8s::dns::serial_of(&zone).unwrap_or_default(),
                    if changed { "changed" } else { "unchanged" },
                    path.display()
                );
            }
            Ok(())
        }
        Command::Plan { node, from_file } => {
            let text = std::fs::read_to_string(&from_file)
                .with_context(|| format!("reading {}", from_file.display()))?;
            let cluster = Cluster::from_yaml(&text)?;
            let p = plan::plan(&cluster, &node)?;
            for problem in &p.problems {
                eprintln!("problem: {problem}");
            }
            println!("node {} ({})", p.desired.self_node.name, p.desired.self_node.addr);
            for (id, port) in &p.desired.ports {
                let backends: Vec<String> = port
                    .backends
                    .iter()
                    .map(|b| format!("{}({})", b.node, b.pod))
                    .collect();
                let local = port
                    .local
                    .as_ref()
                    .map(|l| format!("{} {}:{}", l.pod, l.addr, l.port))
                    .unwrap_or_else(|| "-".into());
                println!("{id:<10} backends {}  local {local}", backends.join(","));
            }
            if p.problems.is_empty() {
                Ok(())
            } else {
                anyhow::bail!("{} problem(s)", p.problems.len())
            }
        }
    }
}
