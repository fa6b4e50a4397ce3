//! `cargo xtask lab`: the embedded default scenario, end to end.

use std::{net::IpAddr, time::Duration};

use anyhow::bail;
use xtask::{
    lab::{Answer, CLIENT_ADDR, CLIENT_ADDR6, Lab, LabConfig, PodSpec, node_addr, node_addr6, node_name},
    progress, target_dir,
};

#[derive(Clone, Debug, clap::Args)]
pub struct LabArgs {
    /// Leave the lab up afterwards (namespaces, agents, pods) to poke at; prints how to.
    #[arg(long)]
    keep: bool,
    /// Remove every lab left up by `--keep` (namespaces, processes, pins) and exit.
    #[arg(long)]
    pub down: bool,
    /// XDP mode for the agents (auto, native, off).
    #[arg(long, default_value = "auto")]
    xdp: String,
    /// Extra arguments for every agent (e.g. `--agent-arg=--tc-attach=netlink`).
    #[arg(long = "agent-arg", value_name = "ARG", allow_hyphen_values = true)]
    agent_args: Vec<String>,
    /// How long the agents may take to be ready (software-emulated VMs need longer).
    #[arg(long, value_name = "SECONDS", default_value_t = 20)]
    wait: u64,
    /// Put this node's address on a VLAN subinterface (eth0.20), its switch port a trunk
    /// carrying the LAN as VLAN 20 (needs the kernel's 8021q).
    #[arg(long, value_name = "NODE")]
    vlan_node: Option<usize>,
    /// A dual-stack LAN: IPv6 (ULA) on every node, pod and the client too, and every request
    /// sent over IPv6 as well.
    #[arg(long)]
    dual_stack: bool,
    /// Run with the binaries already built (inside a test VM): no setup, no build.
    #[arg(long, hide = true)]
    pub no_setup: bool,
}

struct Row {
    node: usize,
    /// The node address the request went to, and the client address the pod must see.
    addr: IpAddr,
    client: IpAddr,
    service: &'static str,
    answer: Answer,
    expected: Vec<String>,
}

pub fn run(args: LabArgs) -> anyhow::Result<()> {
    if args.down {
        let n = xtask::lab::remove_all();
        progress(&format!("removed {n} lab namespaces"));
        return Ok(());
    }
    let cfg = LabConfig {
        nodes: 3,
        st8s_bin: target_dir().join("debug/st8s"),
        xtask_bin: target_dir().join("debug/xtask"),
        prefer_local: true,
        xdp: args.xdp.clone(),
        kubeconfig: None,
        agent_caps: None,
        routed_cni: false,
        dual_stack: args.dual_stack,
    };
    progress("creating the lab: switch, 3 nodes with pod bridges, a client");
    let mut lab = Lab::new(cfg)?;
    if let Some(node) = args.vlan_node {
        if !(1..=3).contains(&node) {
            bail!("--vlan-node {node}: the lab has nodes 1 to 3");
        }
        progress(&format!(
            "{} on VLAN 20: its address on eth0.20, its switch port a trunk",
            node_name(node)
        ));
        lab.uplink_on_vlan(node, 20)?;
    }
    lab.set_agent_args(&args.agent_args.iter().map(String::as_str).collect::<Vec<_>>());
    progress("starting pods: web on node1 and node2 (hostPort 80), dns on node3 (hostPort 53 udp+tcp)");
    lab.add_pod(PodSpec::web("web-node1", 1))?;
    lab.add_pod(PodSpec::web("web-node2", 2))?;
    lab.add_pod(PodSpec::dns("dns-node3", 3))?;
    lab.write_cluster()?;
    progress(&format!("cluster file: {}", lab.cluster_file().display()));
    progress("starting one st8s agent per node");
    lab.start_agents()?;
    lab.wait_synced(Duration::from_secs(args.wait))?;
    // Let the servers bind before the first request.
    std::thread::sleep(Duration::from_millis(200));

    if args.dual_stack {
        progress(
            "sending requests from the client (10.77.0.100, fd00:77::100) to every node, over IPv4 and IPv6",
        );
    } else {
        progress("sending requests from the client (10.77.0.100) to every node");
    }
    let web = vec!["lab/web-node1".to_owned(), "lab/web-node2".to_owned()];
    let dns = vec!["lab/dns-node3".to_owned()];
    let mut rows = Vec::new();
    let mut families = vec![(IpAddr::from(CLIENT_ADDR), false)];
    if args.dual_stack {
        families.push((IpAddr::from(CLIENT_ADDR6), true));
    }
    for (client, v6) in families {
        for node in 1..=3 {
            let addr = if v6 {
                IpAddr::from(node_addr6(node))
            } else {
                IpAddr::from(node_addr(node))
            };
            let expected_web = match node {
                1 => vec!["lab/web-node1".to_owned()],
                2 => vec!["lab/web-node2".to_owned()],
                _ => web.clone(),
            };
            let row = |service, answer, expected| Row {
                node,
                addr,
                client,
                service,
                answer,
                expected,
            };
            rows.push(row("http 80/tcp", lab.http_to(addr, 80), expected_web));
            rows.push(row("dns 53/udp", lab.dns_to(addr, false), dns.clone()));
            rows.push(row("dns 53/tcp", lab.dns_to(addr, true), dns.clone()));
        }
    }

    println!();
    println!(
        "{:<20} {:<12} {:<16} {:<26} {:<10} RESULT",
        "NODE ADDRESSED", "SERVICE", "BACKEND", "CLIENT SEEN", "PATH"
    );
    let mut failed = 0;
    for r in &rows {
        let backend = r.answer.pod.clone().unwrap_or_else(|| "-".into());
        let path = match &r.answer.pod {
            Some(p) if p.ends_with(&format!("-{}", node_name(r.node))) => "local",
            Some(_) => "forwarded",
            None => "-",
        };
        let ok = r.answer.ok && r.expected.contains(&backend) && r.answer.client_addr() == Some(r.client);
        let result = if ok {
            "ok".to_owned()
        } else {
            failed += 1;
            format!(
                "FAILED ({})",
                if r.answer.ok {
                    "wrong backend or client address".to_owned()
                } else {
                    r.answer.detail.clone()
                }
            )
        };
        println!(
            "{:<20} {:<12} {:<16} {:<26} {:<10} {result}",
            format!("{} {}", node_name(r.node), r.addr),
            r.service,
            backend,
            r.answer.client.clone().unwrap_or_else(|| "-".into()),
            path
        );
    }
    println!();
    for node in 1..=3 {
        if let Ok(s) = lab.snapshot(node) {
            let c = st8s::dataplane::inspect::counters_by_port(&s);
            let line: Vec<String> = c
                .iter()
                .map(|(p, c)| {
                    format!(
                        "{p}: local {} fwd {} replied {}",
                        c.delivered_local, c.forwarded, c.replied
                    )
                })
                .collect();
            println!("{} counters  {}", node_name(node), line.join("  |  "));
            let flags = s.config.flags;
            println!(
                "{} attach  xdp {}  tc {}",
                node_name(node),
                if flags & st8s_common::CONFIG_XDP_FORWARDS != 0 {
                    "native"
                } else {
                    "off"
                },
                if flags & st8s_common::CONFIG_TC_NETLINK != 0 {
                    "netlink"
                } else {
                    "tcx"
                }
            );
        }
    }
    // On a VLAN subinterface the agent says so (and TC forwards: the VLAN driver has no native
    // XDP, which the attach line above shows).
    let mut vlan_unsaid = false;
    if let Some(node) = args.vlan_node {
        let log = std::fs::read_to_string(lab.agent_log(node)).unwrap_or_default();
        let said = log
            .lines()
            .find(|l| l.contains("the uplink is a VLAN subinterface"));
        match said {
            Some(l) if l.contains("parent=eth0") && l.contains("vlan=20") => println!(
                "{} uplink  {} (VLAN 20 on eth0), as its agent logged",
                node_name(node),
                lab.uplink(node)
            ),
            _ => vlan_unsaid = true,
        }
    }
    println!();
    if args.keep {
        println!("The lab stays up (id {}). Try:", lab.id);
        println!(
            "  ip netns exec {} curl http://{}/",
            lab.client_ns(),
            node_addr(3)
        );
        println!(
            "  ip netns exec {} dig @{} whoami.lab TXT",
            lab.client_ns(),
            node_addr(1)
        );
        println!(
            "  {} inspect --pin-dir {}",
            target_dir().join("debug/st8s").display(),
            lab.agent_pin_dir(1).display()
        );
        println!(
            "  {} monitor --pin-dir {}   # then a request: one line per decision",
            target_dir().join("debug/st8s").display(),
            lab.agent_pin_dir(3).display()
        );
        println!(
            "  bpftool map dump pinned {}/ST8S_PORTS",
            lab.agent_pin_dir(1).display()
        );
        println!("Tear it down with: cargo xtask lab --down");
        lab.leak();
    } else {
        progress("tearing the lab down");
        drop(lab);
    }
    if failed > 0 {
        bail!("{failed} of {} requests failed", rows.len());
    }
    if vlan_unsaid {
        bail!("the agent on the VLAN node did not log its VLAN uplink (parent eth0, VLAN 20)");
    }
    progress(&format!(
        "all {} requests answered by the right backend, client address kept",
        rows.len()
    ));
    Ok(())
}
