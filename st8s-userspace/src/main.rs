//! `st8s`: the eBPF/XDP traffic-steering agent for small Kubernetes clusters.

use std::path::PathBuf;

use anyhow::Context as _;
use clap::{Parser, Subcommand};
use st8s::{agent, core::plan, dataplane::inspect, sources::file::read_cluster};
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
        /// `text` for people, `json` for scripts (field names as in the maps and the metrics).
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
    /// Stream this node's steering decisions as they happen, one line each (and, with --pcap,
    /// the packets); the programs report only while someone listens.
    Monitor(st8s::dataplane::monitor::MonitorArgs),
    /// Detach the programs and remove every pin (stop the agent first).
    Uninstall {
        #[arg(long, value_name = "DIR", default_value = "/sys/fs/bpf/st8s")]
        pin_dir: PathBuf,
    },
    /// LAN names for CoreDNS: zones from Ingresses, HTTPRoutes, Traefik IngressRoutes, annotated
    /// Services, Nodes and the agents' Leases, kept in a ConfigMap (or rendered once from a file).
    Dns(st8s::dns::watch::DnsArgs),
    /// Print the steering table a node would get from a cluster file, without touching the kernel.
    Plan {
        #[arg(long)]
        node: String,
        #[arg(long, value_name = "PATH")]
        from_file: PathBuf,
        /// `text` for people, `json` for scripts (field names as in `st8s inspect --output json`).
        #[arg(long, value_enum, default_value = "text")]
        output: Output,
    },
}

#[derive(Clone, Copy, Debug, clap::ValueEnum)]
enum Output {
    Text,
    Json,
}

/// `st8s plan --output json`: what this node's maps should hold, with the names `st8s inspect
/// --output json` uses (`port` as `80/tcp`, `node_addr`, `local` as `address:containerPort`).
fn plan_json(p: &st8s::core::Plan) -> serde_json::Value {
    let ports: Vec<serde_json::Value> = p
        .desired
        .ports
        .iter()
        .map(|(id, port)| {
            serde_json::json!({
                "port": id.to_string(),
                "backends": port.backends.iter().map(|b| serde_json::json!({
                    "node": b.node,
                    "node_addr": b.node_addr,
                    "pod": b.pod,
                    "draining": b.draining,
                })).collect::<Vec<_>>(),
                "local": port.local.as_ref().map(|l| format!("{}:{}", l.addr, l.port)),
                "local6": port.local.as_ref().and_then(|l| l.addr6).map(|a| format!("[{a}]:{}", port.local.as_ref().map_or(0, |l| l.port))),
                "local_pod": port.local.as_ref().map(|l| l.pod.clone()),
                "discovery": port.local.as_ref().is_some_and(|l| l.discovery),
            })
        })
        .collect();
    serde_json::json!({
        "node": p.desired.self_node.name,
        "node_addr": p.desired.self_node.addr,
        "node_addr6": p.desired.self_node.addr6,
        "ports": ports,
        "problems": p.problems.iter().map(ToString::to_string).collect::<Vec<_>>(),
    })
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
        Command::Inspect {
            pin_dir,
            flows,
            output,
        } => {
            let s = inspect::snapshot(&pin_dir)?;
            match output {
                Output::Text => print!("{}", inspect::render(&s, flows)),
                Output::Json => println!("{}", serde_json::to_string_pretty(&inspect::to_json(&s, flows))?),
            }
            Ok(())
        }
        Command::Monitor(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(st8s::dataplane::monitor::run(args)),
        Command::Uninstall { pin_dir } => {
            let removed = st8s::dataplane::pins::uninstall(&pin_dir)?;
            if removed.is_empty() {
                println!("nothing pinned under {}", pin_dir.display());
            }
            for p in removed {
                println!("removed {p}");
            }
            Ok(())
        }
        Command::Dns(args) => tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .context("starting the runtime")?
            .block_on(st8s::dns::watch::run(args)),
        Command::Plan {
            node,
            from_file,
            output,
        } => {
            let text = std::fs::read_to_string(&from_file)
                .with_context(|| format!("reading {}", from_file.display()))?;
            let cluster = read_cluster(&text)?;
            let p = plan(&cluster, &node)?;
            for problem in &p.problems {
                eprintln!("problem: {problem}");
            }
            if let Output::Json = output {
                println!("{}", serde_json::to_string_pretty(&plan_json(&p))?);
                return if p.problems.is_empty() {
                    Ok(())
                } else {
                    anyhow::bail!("{} problem(s)", p.problems.len())
                };
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
