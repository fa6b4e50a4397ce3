//! `cargo xtask bench`: st8s against the paths users have today, side by side in one run.
//!
//! Data path: a release build in the network-namespace lab. Every workload is measured on every
//! path in the same run, alternating the paths round by round, and reported as medians:
//!
//! - `direct`: the client sends to the pod address through plain routing (the limit);
//! - `direct-2hop`: the same, routed through node3 first: the hop a forwarded flow takes, as
//!   Linux's own routing takes it (a second address of the pod, which the client routes via node3);
//! - `iptables-fwd`: DNAT + MASQUERADE on the node the client addressed, backend on another node
//!   (kube-proxy with externalTrafficPolicy=Cluster);
//! - `iptables-local`: DNAT to the local pod (the CNI portmap hostPort path);
//! - `haproxy`: a userspace TCP hop on the addressed node (a proxy DaemonSet forwarding to a pod);
//! - `st8s-local`, `st8s-fwd`: st8s with the backend on the addressed node, and on another one.
//!
//! The lab is dual-stack, and `direct-v6`, `ip6tables-fwd`, `ip6tables-local`, `st8s-local-v6`
//! and `st8s-fwd-v6` repeat their IPv4 twins over IPv6 in the same rounds: each IPv6 path is
//! judged by its ratio to `direct-v6` against its twin's ratio to `direct`, round by round
//! (issue 16).
//!
//! Per-packet cost: each program through BPF_PROG_TEST_RUN (1,000,000 repeats) against a program
//! that only parses the same headers. Control plane: event-to-map latency, full-sync time and
//! agent memory with 100, 1,000 and 10,000 pods, against the API-server double.
//!
//! Timings never fail anything: missed targets are printed and written down.

use std::{
    collections::BTreeMap,
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::PathBuf,
    process::Command,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};
use serde_json::json;

use crate::{
    apiserver::{self, ApiServer},
    lab::{API_ADDR, HostPort, Lab, LabConfig, PodSpec, in_netns, node_addr, node_addr6, pod_prefix6},
    progress,
    stats::Spread,
    target_dir, workspace_root,
};

#[derive(Clone, Debug)]
pub struct BenchArgs {
    /// Rounds at least per workload and path.
    pub rounds: usize,
    /// Rounds at most: a workload takes more rounds than `rounds` until its forwarded/direct
    /// interval is narrower than +-5 %, up to this many.
    pub max_rounds: usize,
    /// Only these data paths (`direct`, `st8s-fwd`, ...), when given.
    pub paths: Vec<String>,
    /// Only these workloads (`keep-alive`, `new-conn`, `dns`, `stream`), when given.
    pub workloads: Vec<String>,
    pub seconds: u64,
    pub skip_dataplane: bool,
    pub skip_workloads: bool,
    pub skip_control: bool,
    pub skip_local_clients: bool,
    pub skip_per_packet: bool,
    pub out: PathBuf,
}

fn median(v: &mut [f64]) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(|a, b| a.total_cmp(b));
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

/// Median rate, p50 and p99 of one workload on one path.
type Medians = (f64, Option<f64>, Option<f64>);

/// One measurement of one workload on one path.
#[derive(Clone, Debug, Default)]
struct Sample {
    /// The round it was measured in: samples of one round are paired.
    round: usize,
    /// requests/s, queries/s or bits/s
    rate: f64,
    p50_ms: Option<f64>,
    p99_ms: Option<f64>,
    /// TCP stream: the segments the sender retransmitted (iperf3's count).
    retransmits: Option<u64>,
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    HttpKeepAlive,
    HttpNewConn,
    DnsUdp,
    TcpStream,
}

impl Workload {
    /// The name `--workloads` takes.
    fn short(self) -> &'static str {
        match self {
            Workload::HttpKeepAlive => "keep-alive",
            Workload::HttpNewConn => "new-conn",
            Workload::DnsUdp => "dns",
            Workload::TcpStream => "stream",
        }
    }

    fn name(self) -> &'static str {
        match self {
            Workload::HttpKeepAlive => "HTTP keep-alive (wrk, req/s)",
            Workload::HttpNewConn => "HTTP new connection per request (wrk, req/s)",
            Workload::DnsUdp => "DNS over UDP (dnsperf, queries/s)",
            Workload::TcpStream => "TCP stream (iperf3, Gbit/s)",
        }
    }

    /// A rate of this workload as the report shows it, with its unit.
    fn shown(self, rate: f64) -> String {
        match self {
            Workload::HttpKeepAlive | Workload::HttpNewConn => format!("{rate:.0} req/s"),
            Workload::DnsUdp => format!("{rate:.0} queries/s"),
            Workload::TcpStream => format!("{:.2} Gbit/s", rate / 1e9),
        }
    }
}

const PATHS: [&str; 12] = [
    "direct",
    "direct-2hop",
    "iptables-fwd",
    "iptables-local",
    "haproxy",
    "st8s-local",
    "st8s-fwd",
    "direct-v6",
    "ip6tables-fwd",
    "ip6tables-local",
    "st8s-local-v6",
    "st8s-fwd-v6",
];

/// The IPv6 paths, each with the IPv4 path it repeats over IPv6.
const PATHS6: [(&str, &str); 5] = [
    ("direct-v6", "direct"),
    ("ip6tables-fwd", "iptables-fwd"),
    ("ip6tables-local", "iptables-local"),
    ("st8s-local-v6", "st8s-local"),
    ("st8s-fwd-v6", "st8s-fwd"),
];

/// The paths a path's ratios are taken to: its family's direct path, and the iptables path of
/// its kind when the run has one.
fn baselines(path: &str) -> (&'static str, Option<&'static str>) {
    match path {
        "st8s-local" => ("direct", Some("iptables-local")),
        "st8s-local-v6" => ("direct-v6", Some("ip6tables-local")),
        p if PATHS6.iter().any(|(v6, _)| *v6 == p) => ("direct-v6", Some("ip6tables-fwd")),
        _ => ("direct", Some("iptables-fwd")),
    }
}

/// The data-path servers' pod addresses, both families.
struct Pods {
    v4: BTreeMap<&'static str, Ipv4Addr>,
    /// Each server's second address, which the client routes through node3 (`direct-2hop`).
    via3: BTreeMap<&'static str, Ipv4Addr>,
    v6: BTreeMap<&'static str, Ipv6Addr>,
}

/// Where each path sends a workload: (address, port), or None when the path does not apply.
///
/// HTTP paths end on different nginx ports of the same pod (direct 8081, iptables-fwd 8082,
/// iptables-local 8083, haproxy 8084, st8s-local 8080 via hostPort 80, st8s-fwd 8086 via
/// hostPort 81): with a new connection per request the client recycles its ports within
/// seconds, and a server-side TIME_WAIT left by one path would otherwise stall the next path's
/// SYN from the same port (PAWS), whatever that path is.
///
/// An IPv6 path goes to its IPv4 twin's port on the same pod's or node's IPv6 address.
fn target(w: Workload, path: &str, pods: &Pods) -> Option<SocketAddr> {
    if let Some((_, v4)) = PATHS6.iter().find(|(v6, _)| *v6 == path) {
        let (addr, port) = target4(w, v4, pods)?;
        let addr6 = match pods.v4.iter().find(|(_, a)| **a == addr) {
            Some((name, _)) => pods.v6[name],
            None => node_addr6((1..=3).find(|n| node_addr(*n) == addr)?),
        };
        return Some(SocketAddr::new(IpAddr::V6(addr6), port));
    }
    target4(w, path, pods).map(|(a, p)| SocketAddr::new(IpAddr::V4(a), p))
}

/// An IPv4 path's (address, port).
fn target4(w: Workload, path: &str, pods: &Pods) -> Option<(Ipv4Addr, u16)> {
    if matches!(w, Workload::HttpKeepAlive | Workload::HttpNewConn) {
        return match path {
            "direct" => Some((pods.v4["web"], 8081)),
            "direct-2hop" => Some((pods.via3["web"], 8087)),
            "iptables-fwd" => Some((node_addr(3), 8081)),
            "iptables-local" => Some((node_addr(1), 8081)),
            "haproxy" => Some((node_addr(3), 8082)),
            "st8s-local" => Some((node_addr(1), 80)),
            "st8s-fwd" => Some((node_addr(3), 81)),
            _ => None,
        };
    }
    let (name, pod_port, host_port, ipt_port, haproxy_port) = match w {
        Workload::HttpKeepAlive | Workload::HttpNewConn => ("web", 8080, 80, 8081, Some(8082)),
        Workload::DnsUdp => ("dns", 53, 53, 5354, None),
        Workload::TcpStream => ("iperf", 5201, 5201, 5202, Some(5203)),
    };
    match path {
        "direct" => Some((pods.v4[name], pod_port)),
        "direct-2hop" => Some((pods.via3[name], pod_port)),
        "iptables-fwd" => Some((node_addr(3), ipt_port)),
        "iptables-local" => Some((node_addr(1), ipt_port)),
        "haproxy" => haproxy_port.map(|p| (node_addr(3), p)),
        "st8s-local" => Some((node_addr(1), host_port)),
        "st8s-fwd" => Some((node_addr(3), host_port)),
        _ => None,
    }
}

fn ensure_tools() -> anyhow::Result<()> {
    let need = [
        ("wrk", "wrk"),
        ("iperf3", "iperf3"),
        ("dnsperf", "dnsperf"),
        ("knot", "knotd"),
        ("haproxy", "haproxy"),
        ("nginx-light", "nginx"),
    ];
    let missing: Vec<&str> = need
        .iter()
        .filter(|(_, cmd)| {
            !Command::new("sh")
                .args(["-c", &format!("command -v {cmd} >/dev/null")])
                .status()
                .is_ok_and(|s| s.success())
        })
        .map(|(p, _)| *p)
        .collect();
    if missing.is_empty() {
        return Ok(());
    }
    progress(&format!("installing benchmark tools: {}", missing.join(" ")));
    crate::run(Command::new("apt-get").args(["update", "-qq"]))?;
    crate::run(
        Command::new("env")
            .args([
                "DEBIAN_FRONTEND=noninteractive",
                "apt-get",
                "install",
                "-y",
                "-qq",
            ])
            .args(&missing),
    )
}

pub fn run(args: BenchArgs) -> anyhow::Result<()> {
    if let Some(p) = args.paths.iter().find(|p| !PATHS.contains(&p.as_str())) {
        bail!("no data path {p:?}: {}", PATHS.join(", "));
    }
    if let Some(w) = args
        .workloads
        .iter()
        .find(|w| !WORKLOADS.iter().any(|x| x.short() == w.as_str()))
    {
        let names: Vec<&str> = WORKLOADS.iter().map(|w| w.short()).collect();
        bail!("no workload {w:?}: {}", names.join(", "));
    }
    ensure_tools()?;
    let mut report = String::new();
    let machine = machine();
    let _ = writeln!(report, "# st8s benchmarks\n");
    let _ = writeln!(
        report,
        "Produced by `cargo xtask bench --rounds {} --max-rounds {} --seconds {}` on {} (UTC). \
         Machine: {machine}.\n",
        args.rounds,
        args.max_rounds,
        args.seconds,
        utc_now()
    );
    let _ = writeln!(
        report,
        "Everything below was measured in this one run. Release build; the network-namespace lab \
         (client, three nodes, pod bridges) of `cargo xtask lab`. Client and servers share the \
         machine's cores, so absolute numbers are those of a loaded 2-core VM; the ratios \
         between paths measured side by side are the point.\n"
    );
    let mut misses = Vec::new();
    if !args.skip_dataplane {
        // Per-packet cost first, on a quiet machine (no lab traffic, no servers).
        let mut pp = String::new();
        if !args.skip_per_packet {
            per_packet(&mut pp, &mut misses)?;
        }
        if !args.skip_workloads {
            dataplane(&args, &mut report, &mut misses)?;
        }
        if !args.skip_local_clients {
            local_clients(&args, &mut report, &mut misses)?;
        }
        report.push_str(&pp);
    }
    if !args.skip_control {
        control_plane(&mut report, &mut misses)?;
    }
    let _ = writeln!(report, "## Targets\n");
    let _ = writeln!(
        report,
        "Findings behind these numbers, what was changed because of them, and why the remaining \
         misses miss: [performance.md](performance.md).\n"
    );
    if misses.is_empty() {
        let _ = writeln!(
            report,
            "Every target was met in this run, on the end of its interval that could miss it.\n"
        );
    } else {
        let _ = writeln!(report, "Missed in this run:\n");
        for m in &misses {
            let _ = writeln!(report, "- {m}");
        }
        let _ = writeln!(report);
    }
    fs::create_dir_all(args.out.parent().unwrap_or(&workspace_root()))?;
    fs::write(&args.out, &report).with_context(|| format!("writing {}", args.out.display()))?;
    println!("{report}");
    progress(&format!("written to {}", args.out.display()));
    Ok(())
}

fn machine() -> String {
    let cpuinfo = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = cpuinfo
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .map(|m| m.trim_start_matches([' ', '\t', ':']).to_owned())
        .unwrap_or_else(|| "unknown CPU".into());
    let cores = cpuinfo.lines().filter(|l| l.starts_with("processor")).count();
    let mem = fs::read_to_string("/proc/meminfo")
        .unwrap_or_default()
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.split_whitespace().next()?.parse::<u64>().ok())
        .map(|kb| format!("{:.0} GiB", kb as f64 / 1024.0 / 1024.0))
        .unwrap_or_default();
    let kernel = fs::read_to_string("/proc/sys/kernel/osrelease").unwrap_or_default();
    format!("{model}, {cores} vCPU, {mem} RAM, Linux {}", kernel.trim())
}

fn utc_now() -> String {
    Command::new("date")
        .args(["-u", "+%Y-%m-%d %H:%M"])
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

fn sh_ok(cmd: &mut Command) -> anyhow::Result<String> {
    let out = cmd.output().with_context(|| format!("running {cmd:?}"))?;
    if !out.status.success() {
        bail!("{cmd:?} failed: {}", String::from_utf8_lossy(&out.stderr).trim());
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

fn bench_lab(dual_stack: bool) -> anyhow::Result<Lab> {
    Lab::new(LabConfig {
        nodes: 3,
        st8s_bin: target_dir().join("release/st8s"),
        xtask_bin: target_dir().join("debug/xtask"),
        prefer_local: true,
        xdp: "auto".into(),
        kubeconfig: None,
        agent_caps: None,
        routed_cni: false,
        dual_stack,
    })
}

fn dataplane(args: &BenchArgs, report: &mut String, misses: &mut Vec<String>) -> anyhow::Result<()> {
    let (lab, pods, queries) = data_path_lab()?;
    let mut haproxy = baseline_paths(&lab, &pods)?;
    let results = run_workloads(args, &lab, &pods, &queries);
    let _ = haproxy.kill();
    let _ = haproxy.wait();
    drop(lab);
    let med = data_path_report(args, report, &results);
    data_path_targets(&results, &med, misses);
    ipv6_report(report, misses, &results);
    Ok(())
}

/// The four workloads of the data path.
const WORKLOADS: [Workload; 4] = [
    Workload::HttpKeepAlive,
    Workload::HttpNewConn,
    Workload::DnsUdp,
    Workload::TcpStream,
];

/// The lab with the servers on node1 (nginx, knotd, iperf3) and its agents synced: the lab, the
/// servers' pod addresses, and dnsperf's query file.
fn data_path_lab() -> anyhow::Result<(Lab, Pods, PathBuf)> {
    progress("data path: building the lab with nginx, knotd and iperf3 pods on node1");
    let mut lab = bench_lab(true)?;
    let dir = lab.dir().to_owned();
    // nginx: one static answer, keep-alive without a request cap, on both families.
    let nginx_conf = dir.join("nginx.conf");
    let listen: String = [8080, 8081, 8082, 8083, 8084, 8086, 8087]
        .iter()
        .map(|p| format!("listen {p}; listen [::]:{p}; "))
        .collect();
    fs::write(
        &nginx_conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx.pid;\nerror_log {d}/nginx.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 60s;\n\
             client_body_temp_path {d}/nginx-body; proxy_temp_path {d}/nginx-proxy;\n\
             fastcgi_temp_path {d}/nginx-fcgi; uwsgi_temp_path {d}/nginx-uwsgi; scgi_temp_path {d}/nginx-scgi;\n\
             server {{ {listen}location / {{ return 200 \"pod=lab/web-node1\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    // knotd: an authoritative zone.
    let zone = dir.join("bench.lab.zone");
    fs::write(
        &zone,
        "$ORIGIN bench.lab.\n$TTL 60\n@ SOA ns admin 1 3600 600 86400 60\n@ NS ns\nns A 10.244.1.53\nwww A 10.77.0.11\nwww A 10.77.0.12\n",
    )?;
    let knot_conf = dir.join("knot.conf");
    fs::write(
        &knot_conf,
        format!(
            "server:\n  listen: [ 0.0.0.0@53, ::@53 ]\n  rundir: {d}\n  udp-workers: 1\n  tcp-workers: 1\n  background-workers: 1\n\
             database:\n  storage: {d}/knot-db\nlog:\n  - target: stderr\n    any: warning\n\
             zone:\n  - domain: bench.lab\n    file: {z}\n",
            d = dir.display(),
            z = zone.display()
        ),
    )?;
    let queries = dir.join("queries.txt");
    fs::write(&queries, "www.bench.lab A\nns.bench.lab A\nbench.lab SOA\n")?;
    let cmd = |v: &[&str]| Some(v.iter().map(|s| (*s).to_owned()).collect());
    lab.add_pod(PodSpec {
        name: "web-node1".into(),
        node: 1,
        ports: vec![
            HostPort {
                host: 80,
                container: 8080,
                proto: "TCP",
            },
            HostPort {
                host: 81,
                container: 8086,
                proto: "TCP",
            },
        ],
        http: None,
        dns: None,
        discovery: Vec::new(),
        command: Some(nginx_on_cpu1(&nginx_conf)),
    })?;
    lab.add_pod(PodSpec {
        name: "dns-node1".into(),
        node: 1,
        ports: vec![HostPort {
            host: 53,
            container: 53,
            proto: "UDP",
        }],
        http: None,
        dns: None,
        discovery: Vec::new(),
        command: cmd(&[
            "taskset",
            "-c",
            "1",
            "knotd",
            "-c",
            knot_conf.to_str().unwrap_or_default(),
        ]),
    })?;
    lab.add_pod(PodSpec {
        name: "iperf-node1".into(),
        node: 1,
        ports: vec![HostPort {
            host: 5201,
            container: 5201,
            proto: "TCP",
        }],
        http: None,
        dns: None,
        discovery: Vec::new(),
        command: cmd(&["taskset", "-c", "1", "iperf3", "-s", "-p", "5201"]),
    })?;
    let mut pods = Pods {
        v4: BTreeMap::new(),
        via3: BTreeMap::new(),
        v6: BTreeMap::new(),
    };
    for (name, pod) in [
        ("web", "web-node1"),
        ("dns", "dns-node1"),
        ("iperf", "iperf-node1"),
    ] {
        let v4 = lab.pod_ip(pod).context("pod ip")?;
        pods.v4.insert(name, v4);
        // A second address in the pod's own subnet (node1's bridge reaches it on-link).
        let o = v4.octets();
        anyhow::ensure!(
            o[3] < 100,
            "pod address {v4} leaves no room for its second address"
        );
        let via3 = Ipv4Addr::new(o[0], o[1], o[2], o[3] + 100);
        let out = lab.run_in_pod(pod, &["ip", "addr", "add", &format!("{via3}/24"), "dev", "eth0"])?;
        anyhow::ensure!(
            out.status.success(),
            "adding {via3} to {pod}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        pods.via3.insert(name, via3);
        pods.v6
            .insert(name, lab.pod_ip6(pod).context("pod IPv6 address")?);
    }
    lab.write_cluster()?;
    lab.start_agents()?;
    lab.wait_synced(Duration::from_secs(30))?;
    load_generator(|argv| {
        sh_ok(
            Command::new("ip")
                .args(["netns", "exec", lab.client_ns()])
                .args(argv),
        )
    })?;
    Ok((lab, pods, queries))
}

/// Sets up the namespace a load generator (wrk) runs in, through `exec` (a command run there),
/// the way load generators are tuned: outgoing connections may take a port that an earlier
/// connection left in TIME_WAIT (`tcp_tw_reuse=1`, which Linux allows only when the new
/// connection's timestamps are newer, so nothing is confused).
///
/// Without it, one new-connection measurement of `direct` (about 65,000 connections in 4 s)
/// left about 14,000 of the client's 28,232 ephemeral ports in TIME_WAIT for 60 s: the next
/// measurement of the same path fell from 16,862 to 1,484 requests/s, and the one after to 652,
/// while st8s's paths (whose client closes second more often, leaving a tenth as many) held
/// 16,000. A round measures every path once, about 40 s apart, so `direct` was measured on a
/// port space its previous round had filled: new-connection ratios depended on history and on
/// which side closed first, not on the path.
fn load_generator(exec: impl Fn(&[&str]) -> anyhow::Result<String>) -> anyhow::Result<()> {
    exec(&["sysctl", "-qw", "net.ipv4.tcp_tw_reuse=1"])
        .map(drop)
        .context("letting the load generator reuse TIME_WAIT ports")
}

/// nginx with the configuration `conf`, on CPU 1 (where every benchmark server runs).
fn nginx_on_cpu1(conf: &std::path::Path) -> Vec<String> {
    ["taskset", "-c", "1", "nginx", "-c"]
        .into_iter()
        .map(String::from)
        .chain([conf.to_string_lossy().into_owned()])
        .collect()
}

/// The paths st8s is compared with: the client routes pod addresses through node1 (`direct`),
/// iptables DNAT on node3 (forwarded, with MASQUERADE) and node1 (local), and haproxy on node3;
/// over IPv6 the direct route and ip6tables DNAT on node3 (with MASQUERADE) and node1. Returns
/// the running haproxy.
///
/// Both families get NAT rules on both nodes: a NAT rule puts every packet of its family through
/// conntrack on that node, so rules for IPv4 alone would slow IPv4's `direct` path (routed
/// through node1) and not IPv6's, and skew the comparison of the families. A dual-stack
/// kube-proxy installs rules for both.
fn baseline_paths(lab: &Lab, all: &Pods) -> anyhow::Result<std::process::Child> {
    let dir = lab.dir().to_owned();
    let pods = &all.v4;
    // The client routes the pods' addresses through node1 (the `direct` paths), both families.
    let prefix6 = format!("{}/64", pod_prefix6(1));
    sh_ok(Command::new("ip").args([
        "-n",
        lab.client_ns(),
        "-6",
        "route",
        "add",
        &prefix6,
        "via",
        &node_addr6(1).to_string(),
    ]))?;
    sh_ok(Command::new("ip").args([
        "-n",
        lab.client_ns(),
        "route",
        "add",
        "10.244.1.0/24",
        "via",
        &node_addr(1).to_string(),
    ]))?;
    // `direct-2hop`: the servers' second addresses through node3, which routes node1's pod
    // network to node1 (host-gw); the replies go from node1 straight to the client, as a
    // forwarded flow's do. node3 sends no ICMP redirects: Linux sends one when it forwards a
    // packet out of the interface it came in on, the client then sends straight to node1, and
    // the path is one hop. Measured on the switch: node3's port received 61 frames in 3 s of a
    // 5.3 Gbit/s `direct-2hop` stream, against 310,592 for `st8s-fwd`'s.
    for key in ["all", "default", "eth0"] {
        sh_ok(Command::new("ip").args([
            "netns",
            "exec",
            lab.node_ns(3),
            "sysctl",
            "-qw",
            &format!("net.ipv4.conf.{key}.send_redirects=0"),
        ]))?;
    }
    for a in all.via3.values() {
        sh_ok(Command::new("ip").args([
            "-n",
            lab.client_ns(),
            "route",
            "add",
            &format!("{a}/32"),
            "via",
            &node_addr(3).to_string(),
        ]))?;
    }
    // NAT in both families: forwarded on node3 (DNAT + MASQUERADE), local on node1 (DNAT only).
    for v6 in [false, true] {
        let tool = if v6 { "ip6tables" } else { "iptables" };
        let addr = |name: &str| -> IpAddr {
            if v6 {
                all.v6[name].into()
            } else {
                all.v4[name].into()
            }
        };
        for (node, masquerade, web_port) in [(3, true, 8082), (1, false, 8083)] {
            let ns = lab.node_ns(node);
            for (proto, from, to_name, to_port) in [
                ("tcp", 8081, "web", web_port),
                ("udp", 5354, "dns", 53),
                ("tcp", 5202, "iperf", 5201),
            ] {
                let to = addr(to_name);
                let (from, port) = (from.to_string(), to_port.to_string());
                // "10.244.1.5:53", "[fd00:244:1::5]:53": as both tools take it.
                let dest = SocketAddr::new(to, to_port).to_string();
                let to = to.to_string();
                // Only packets to the node's own addresses, as the CNI portmap plugin and
                // kube-proxy match them (`-m addrtype --dst-type LOCAL`): a packet routed through
                // the node to a pod keeps its destination.
                let dnat = [
                    "-A",
                    "PREROUTING",
                    "-p",
                    proto,
                    "-m",
                    "addrtype",
                    "--dst-type",
                    "LOCAL",
                    "--dport",
                    &from,
                    "-j",
                    "DNAT",
                    "--to-destination",
                    &dest,
                ];
                let masq = [
                    "-A",
                    "POSTROUTING",
                    "-p",
                    proto,
                    "-d",
                    &to,
                    "--dport",
                    &port,
                    "-j",
                    "MASQUERADE",
                ];
                let rules: &[&[&str]] = if masquerade { &[&dnat, &masq] } else { &[&dnat] };
                for rule in rules {
                    sh_ok(
                        Command::new("ip")
                            .args(["netns", "exec", ns, tool, "-t", "nat"])
                            .args(*rule),
                    )?;
                }
            }
        }
    }
    // haproxy on node3: a TCP hop to the pods.
    let haproxy_conf = dir.join("haproxy.cfg");
    fs::write(
        &haproxy_conf,
        format!(
            "global\n  nbthread 1\n  maxconn 4000\ndefaults\n  mode tcp\n  timeout connect 5s\n  timeout client 60s\n  timeout server 60s\n\
             listen web\n  bind 0.0.0.0:8082\n  server pod {web}:8084\n\
             listen iperf\n  bind 0.0.0.0:5203\n  server pod {iperf}:5201\n",
            web = pods["web"],
            iperf = pods["iperf"]
        ),
    )?;
    let haproxy = Command::new("ip")
        .args([
            "netns",
            "exec",
            lab.node_ns(3),
            "taskset",
            "-c",
            "1",
            "haproxy",
            "-db",
            "-f",
        ])
        .arg(&haproxy_conf)
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("starting haproxy")?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(haproxy)
}

/// Every workload on every path, rounds rotating the order of the paths.
fn run_workloads(
    args: &BenchArgs,
    lab: &Lab,
    pods: &Pods,
    queries: &std::path::Path,
) -> BTreeMap<(Workload, &'static str), Vec<Sample>> {
    let mut results: BTreeMap<(Workload, &'static str), Vec<Sample>> = BTreeMap::new();
    let client = lab.client_ns().to_owned();
    let d = args.seconds.to_string();
    let paths: Vec<&'static str> = PATHS
        .into_iter()
        .filter(|p| args.paths.is_empty() || args.paths.iter().any(|a| a == p))
        .collect();
    for w in WORKLOADS {
        if !args.workloads.is_empty() && !args.workloads.iter().any(|a| a == w.short()) {
            continue;
        }
        // Warm every path once (ARP, conntrack, flow tables) before measuring.
        for path in &paths {
            if let Some(t) = target(w, path, pods) {
                let _ = measure(&client, w, t, "1", queries);
            }
        }
        let mut round = 0;
        loop {
            let mut order = paths.clone();
            order.rotate_left(round % paths.len().max(1));
            for path in order {
                let Some(t) = target(w, path, pods) else { continue };
                progress(&format!("{} | round {} | {path}", w.name(), round + 1));
                match measure(&client, w, t, &d, queries) {
                    Ok(s) => {
                        let retransmits = s.retransmits.map(|r| format!(", {r} retransmitted"));
                        eprintln!(
                            "    {path}: {}{}",
                            w.shown(s.rate),
                            retransmits.unwrap_or_default()
                        );
                        results.entry((w, path)).or_default().push(Sample { round, ..s })
                    }
                    Err(e) => eprintln!("    {path}: {e:#}"),
                }
            }
            round += 1;
            if round < args.rounds {
                continue;
            }
            // As many rounds as it takes for the forwarded path's ratio to direct routing to be
            // known within +-5 %, up to the most the run allows.
            let width = paired(&results, w, "st8s-fwd", "direct").map(|s| s.relative_half_width());
            let judged = ["st8s-fwd", "direct"].iter().all(|p| paths.contains(p));
            match width {
                _ if !judged => break,
                Some(h) if h < 0.05 => break,
                _ if round >= args.max_rounds => {
                    progress(&format!(
                        "{}: forwarded/direct still +-{:.1} % after {round} rounds (--max-rounds)",
                        w.name(),
                        width.unwrap_or(f64::NAN) * 100.0
                    ));
                    break;
                }
                _ => progress(&format!(
                    "{}: forwarded/direct +-{:.1} % after {round} rounds: one more",
                    w.name(),
                    width.unwrap_or(f64::NAN) * 100.0
                )),
            }
        }
    }
    results
}

/// Path `a` against path `b` on workload `w`, round by round (the rounds that measured both).
fn paired(
    results: &BTreeMap<(Workload, &'static str), Vec<Sample>>,
    w: Workload,
    a: &str,
    b: &str,
) -> Option<Spread> {
    let xs = results.get(&(w, a))?;
    let ys = results.get(&(w, b))?;
    let ratios: Vec<f64> = xs
        .iter()
        .filter_map(|x| ys.iter().find(|y| y.round == x.round).map(|y| x.rate / y.rate))
        .collect();
    Spread::of(&ratios)
}

/// How many rounds workload `w` took.
fn rounds_of(results: &BTreeMap<(Workload, &'static str), Vec<Sample>>, w: Workload) -> usize {
    results
        .iter()
        .filter(|((x, _), _)| *x == w)
        .flat_map(|(_, v)| v.iter().map(|s| s.round + 1))
        .max()
        .unwrap_or(0)
}

/// The data-path tables: per workload, each path with its median rate and latencies and its
/// ratios. Returns the medians.
fn data_path_report(
    args: &BenchArgs,
    report: &mut String,
    results: &BTreeMap<(Workload, &'static str), Vec<Sample>>,
) -> BTreeMap<(Workload, &'static str), Medians> {
    let _ = writeln!(report, "## Data path\n");
    let _ = writeln!(
        report,
        "Rounds of {} s, every path once per round in a rotating order; at least {} rounds per \
         workload, and more (up to {}) until the forwarded path's ratio to `direct` is known within \
         +-5 %. Rates and latencies are medians of the rounds. A ratio is the geometric mean of \
         the per-round ratios (each between two paths measured in the same round), with its 95 % \
         confidence interval and, below it, the range of the rounds. Ratios are to `direct` and to \
         `iptables-fwd` (or `iptables-local` for `st8s-local`); an IPv6 path's (`-v6`, \
         `ip6tables-*`) to `direct-v6` and its `ip6tables` twin. NAT rules sit on node1 and node3 \
         in both families, so both `direct` paths cross conntrack alike. Every client runs on CPU 0 \
         and every server (nginx, knotd, iperf3, haproxy) on CPU 1, for every path. wrk: 1 thread, \
         32 connections. dnsperf: 10 clients. iperf3: one TCP stream.\n",
        args.seconds, args.rounds, args.max_rounds
    );
    let mut med: BTreeMap<(Workload, &'static str), Medians> = BTreeMap::new();
    for ((w, p), samples) in results {
        let mut rates: Vec<f64> = samples.iter().map(|s| s.rate).collect();
        let mut p50: Vec<f64> = samples.iter().filter_map(|s| s.p50_ms).collect();
        let mut p99: Vec<f64> = samples.iter().filter_map(|s| s.p99_ms).collect();
        med.insert(
            (*w, p),
            (
                median(&mut rates),
                (!p50.is_empty()).then(|| median(&mut p50)),
                (!p99.is_empty()).then(|| median(&mut p99)),
            ),
        );
    }
    for w in WORKLOADS {
        if rounds_of(results, w) == 0 {
            continue;
        }
        let _ = writeln!(report, "### {} ({} rounds)\n", w.name(), rounds_of(results, w));
        let _ = writeln!(
            report,
            "| path | rate | p50 | p99 | vs direct | 95 % CI | range | vs iptables | 95 % CI | range |"
        );
        let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|");
        for path in PATHS {
            let Some((rate, p50, p99)) = med.get(&(w, path)) else {
                continue;
            };
            let (direct, ipt) = baselines(path);
            let shown = if w == Workload::TcpStream {
                format!("{:.2}", rate / 1e9)
            } else {
                format!("{rate:.0}")
            };
            let ms = |v: &Option<f64>| v.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into());
            let ratio = |b: Option<&str>| match b {
                Some(b) if b == path => "1.00x | - | -".to_owned(),
                Some(b) => paired(results, w, path, b).map_or_else(
                    || "- | - | -".to_owned(),
                    |s| format!("{:.2}x | {} | {}", s.mean, s.interval(), s.range()),
                ),
                None => "- | - | -".to_owned(),
            };
            let _ = writeln!(
                report,
                "| {path} | {shown} | {} | {} | {} | {} |",
                ms(p50),
                ms(p99),
                ratio(Some(direct)),
                ratio(ipt)
            );
        }
        let _ = writeln!(report);
        if let Some(s) = paired(results, w, "st8s-fwd", "direct-2hop") {
            let _ = writeln!(
                report,
                "The forwarding hop: `st8s-fwd` against `direct-2hop` (the same two hops, node3 \
                 routing as Linux does) {:.2}x, 95 % CI {}, range {}.\n",
                s.mean,
                s.interval(),
                s.range()
            );
        }
    }
    med
}

/// Issue 16: each st8s IPv6 path against its IPv4 twin, both as ratios to their family's direct
/// path. Rounds are paired: a round's IPv6 ratio over the same round's IPv4 ratio; judged (within
/// 5 %) on the lower end of the interval.
fn ipv6_report(
    report: &mut String,
    misses: &mut Vec<String>,
    results: &BTreeMap<(Workload, &'static str), Vec<Sample>>,
) {
    let _ = writeln!(report, "### IPv6 against IPv4\n");
    let _ = writeln!(
        report,
        "Each st8s path over IPv6 as a ratio to `direct-v6`, over the same path's IPv4 ratio to \
         `direct`, round by round; their geometric mean, its 95 % confidence interval and the \
         range. Target: within 5 % (the interval above 0.95).\n"
    );
    let _ = writeln!(
        report,
        "| workload | path | IPv4 vs direct | IPv6 vs direct-v6 | IPv6/IPv4 | 95 % CI | range |"
    );
    let _ = writeln!(report, "|---|---|---:|---:|---:|---:|---:|");
    let rate = |w: Workload, path: &str, round: usize| {
        results
            .get(&(w, path))?
            .iter()
            .find(|s| s.round == round)
            .map(|s| s.rate)
    };
    for w in WORKLOADS {
        for (v6, v4) in [("st8s-local-v6", "st8s-local"), ("st8s-fwd-v6", "st8s-fwd")] {
            let mut pairs = Vec::new();
            for round in 0..rounds_of(results, w) {
                let (Some(a4), Some(d4), Some(a6), Some(d6)) = (
                    rate(w, v4, round),
                    rate(w, "direct", round),
                    rate(w, v6, round),
                    rate(w, "direct-v6", round),
                ) else {
                    continue;
                };
                pairs.push((a6 / d6) / (a4 / d4));
            }
            let (Some(s), Some(r4), Some(r6)) = (
                Spread::of(&pairs),
                paired(results, w, v4, "direct"),
                paired(results, w, v6, "direct-v6"),
            ) else {
                continue;
            };
            let _ = writeln!(
                report,
                "| {} | {v6} | {:.2}x | {:.2}x | {:.2} | {} | {} |",
                w.name(),
                r4.mean,
                r6.mean,
                s.mean,
                s.interval(),
                s.range()
            );
            if s.lo < 0.95 {
                misses.push(format!(
                    "{}: {v6} {:.2} of {v4} (95 % CI {}), as ratios to direct routing (target >= 0.95)",
                    w.name(),
                    s.mean,
                    s.interval()
                ));
            }
        }
    }
    let _ = writeln!(report);
}

/// The data path's targets (issue 18, and issue 4's p99 for HTTP), each judged on the end of its
/// ratio's confidence interval that could miss it: forwarded >= 0.95x direct and >= 1.2x
/// iptables, local >= 1.0x direct.
fn data_path_targets(
    results: &BTreeMap<(Workload, &'static str), Vec<Sample>>,
    med: &BTreeMap<(Workload, &'static str), Medians>,
    misses: &mut Vec<String>,
) {
    for w in WORKLOADS {
        for (path, base, what, limit) in [
            ("st8s-fwd", "direct", "forwarded", 0.95),
            ("st8s-fwd", "iptables-fwd", "forwarded", 1.2),
            ("st8s-local", "direct", "local", 1.0),
        ] {
            let Some(s) = paired(results, w, path, base) else {
                continue;
            };
            if s.lo < limit {
                misses.push(format!(
                    "{}: {what} {:.2}x {base} (95 % CI {}; target >= {limit}x)",
                    w.name(),
                    s.mean,
                    s.interval()
                ));
            }
        }
        if let (Some((_, _, Some(fp))), Some((_, _, Some(dp)))) =
            (med.get(&(w, "st8s-fwd")), med.get(&(w, "direct")))
            && *fp > 1.1 * dp
        {
            misses.push(format!(
                "{}: forwarded p99 {:.2}x direct (medians; target <= 1.1x)",
                w.name(),
                fp / dp
            ));
        }
    }
}

fn measure(
    client: &str,
    w: Workload,
    to: SocketAddr,
    secs: &str,
    queries: &std::path::Path,
) -> anyhow::Result<Sample> {
    // Every client on CPU 0, whatever the path (the servers are on CPU 1).
    let exec = |args: &[&str]| -> anyhow::Result<String> {
        sh_ok(
            Command::new("ip")
                .args(["netns", "exec", client, "taskset", "-c", "0"])
                .args(args),
        )
    };
    match w {
        Workload::HttpKeepAlive | Workload::HttpNewConn => {
            let url = format!("http://{to}/");
            let out = exec(
                &wrk_args(w, &url, secs)
                    .iter()
                    .map(String::as_str)
                    .collect::<Vec<_>>(),
            )?;
            wrk_sample(&out, &url)
        }
        Workload::DnsUdp => {
            let out = exec(&[
                "dnsperf",
                "-s",
                &to.ip().to_string(),
                "-p",
                &to.port().to_string(),
                "-d",
                queries.to_str().unwrap_or_default(),
                "-l",
                secs,
                "-c",
                "10",
                "-q",
                "200",
                "-t",
                "2",
            ])?;
            let rate = out
                .lines()
                .find_map(|l| l.trim().strip_prefix("Queries per second:"))
                .and_then(|v| v.trim().parse().ok())
                .context("no Queries per second in dnsperf output")?;
            Ok(Sample {
                rate,
                ..Sample::default()
            })
        }
        Workload::TcpStream => {
            let out = exec(&[
                "iperf3",
                "-c",
                &to.ip().to_string(),
                "-p",
                &to.port().to_string(),
                "-t",
                secs,
                "-J",
            ])?;
            let v: serde_json::Value = serde_json::from_str(&out).context("iperf3 JSON")?;
            let rate = v["end"]["sum_received"]["bits_per_second"]
                .as_f64()
                .context("no bits_per_second")?;
            Ok(Sample {
                rate,
                retransmits: v["end"]["sum_sent"]["retransmits"].as_u64(),
                ..Sample::default()
            })
        }
    }
}

/// wrk as every HTTP workload runs it: one thread, 32 connections, latency percentiles.
fn wrk_args(w: Workload, url: &str, secs: &str) -> Vec<String> {
    let mut a: Vec<String> = [
        "wrk",
        "-t1",
        "-c32",
        "-d",
        &format!("{secs}s"),
        "--latency",
        "--timeout",
        "2s",
    ]
    .map(String::from)
    .to_vec();
    if w == Workload::HttpNewConn {
        a.extend(["-H".into(), "Connection: close".into()]);
    }
    a.push(url.to_owned());
    a
}

/// Rate and percentiles from wrk's output.
fn wrk_sample(out: &str, url: &str) -> anyhow::Result<Sample> {
    let rate = out
        .lines()
        .find_map(|l| l.strip_prefix("Requests/sec:"))
        .and_then(|v| v.trim().parse().ok())
        .context("no Requests/sec in wrk output")?;
    let errors = out
        .lines()
        .find(|l| l.contains("Socket errors") || l.contains("Non-2xx"));
    if let Some(e) = errors {
        eprintln!("    wrk {url}: {}", e.trim());
    }
    let pct = |p: &str| {
        out.lines().find_map(|l| {
            let mut f = l.split_whitespace();
            (f.next() == Some(p))
                .then(|| f.next().and_then(parse_duration_ms))
                .flatten()
        })
    };
    Ok(Sample {
        rate,
        p50_ms: pct("50%"),
        p99_ms: pct("99%"),
        ..Sample::default()
    })
}

/// Issue 13: a pod that connects through its own node's address (the socket hooks send it to
/// the backend pod on that node) against the same pod connecting to the backend pod's address
/// directly. Both run wrk inside one client pod on node1, against one nginx pod on node1;
/// rounds are paired (each round measures both paths, the order alternating), and the ratio of
/// each pair is what the targets judge: its median, with the spread of all pairs.
fn local_clients(args: &BenchArgs, report: &mut String, misses: &mut Vec<String>) -> anyhow::Result<()> {
    progress("local clients: a client pod and an nginx pod on node1");
    let mut lab = bench_lab(false)?;
    let dir = lab.dir().to_owned();
    let nginx_conf = dir.join("nginx-local.conf");
    // Two ports, one per path, so that TIME_WAIT of one path never meets the other's SYNs.
    fs::write(
        &nginx_conf,
        format!(
            "worker_processes 1;\ndaemon off;\npid {d}/nginx-local.pid;\nerror_log {d}/nginx-local.err warn;\n\
             events {{ worker_connections 4096; }}\n\
             http {{ access_log off; keepalive_requests 1000000; keepalive_timeout 60s;\n\
             client_body_temp_path {d}/nl-body; proxy_temp_path {d}/nl-proxy;\n\
             fastcgi_temp_path {d}/nl-fcgi; uwsgi_temp_path {d}/nl-uwsgi; scgi_temp_path {d}/nl-scgi;\n\
             server {{ listen 8087; listen 8088; location / {{ return 200 \"pod=lab/web-node1\\n\"; }} }} }}\n",
            d = dir.display()
        ),
    )?;
    lab.add_pod(PodSpec {
        name: "web-node1".into(),
        node: 1,
        ports: vec![HostPort {
            host: 82,
            container: 8087,
            proto: "TCP",
        }],
        http: None,
        dns: None,
        discovery: Vec::new(),
        // Server and client on CPUs of their own, the same for both paths: on a 2-core machine
        // the scheduler's placement otherwise moves the ratio more than the paths do.
        command: Some(nginx_on_cpu1(&nginx_conf)),
    })?;
    lab.add_pod(PodSpec {
        name: "client".into(),
        node: 1,
        ports: Vec::new(),
        http: None,
        dns: None,
        discovery: Vec::new(),
        command: Some(["sleep", "3600"].map(String::from).to_vec()),
    })?;
    lab.write_cluster()?;
    lab.start_agents()?;
    lab.wait_synced(Duration::from_secs(30))?;
    lab.wait_table(1, Duration::from_secs(30), |s| s.local_clients)
        .context("node1's socket hooks")?;
    load_generator(|argv| {
        let out = lab.run_in_pod("client", argv)?;
        anyhow::ensure!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
        Ok(String::from_utf8_lossy(&out.stdout).into_owned())
    })?;
    let web = lab.pod_ip("web-node1").context("pod ip")?;
    let urls = [
        ("direct", format!("http://{web}:8088/")),
        ("st8s", format!("http://{}:82/", node_addr(1))),
    ];
    let secs = args.seconds.to_string();
    let run = |w: Workload, url: &str, secs: &str| -> anyhow::Result<Sample> {
        let a = wrk_args(w, url, secs);
        let argv: Vec<&str> = ["taskset", "-c", "0"]
            .into_iter()
            .chain(a.iter().map(String::as_str))
            .collect();
        let out = lab.run_in_pod("client", &argv)?;
        anyhow::ensure!(
            out.status.success(),
            "wrk: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        wrk_sample(&String::from_utf8_lossy(&out.stdout), url)
    };
    let _ = writeln!(
        report,
        "## Clients on the node itself
"
    );
    let _ = writeln!(
        report,
        "A pod on node1 runs wrk (1 thread, 32 connections, on CPU 0) against an nginx pod on node1 \
         (one worker, on CPU 1): `direct` to the pod's address, `st8s` to node1's address and hostPort, which the socket hooks send \
         to the pod. {} paired rounds of {} s, the order alternating; the ratio is the geometric \
         mean of st8s/direct per round, with its 95 % confidence interval and the range.\n",
        args.rounds, args.seconds
    );
    let _ = writeln!(
        report,
        "| workload | direct | st8s | ratio | 95 % CI | range | target |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|---:|");
    for (w, target) in [(Workload::HttpKeepAlive, 0.98), (Workload::HttpNewConn, 0.95)] {
        for (_, url) in &urls {
            let _ = run(w, url, "1");
        }
        let (mut direct, mut st8s, mut ratios) = (Vec::new(), Vec::new(), Vec::new());
        for round in 0..args.rounds {
            progress(&format!(
                "local clients | {} | round {}/{}",
                w.name(),
                round + 1,
                args.rounds
            ));
            let mut pair = [0.0f64; 2];
            let order: [usize; 2] = if round % 2 == 0 { [0, 1] } else { [1, 0] };
            for i in order {
                pair[i] = run(w, &urls[i].1, &secs)?.rate;
            }
            direct.push(pair[0]);
            st8s.push(pair[1]);
            ratios.push(pair[1] / pair[0]);
        }
        let r = Spread::of(&ratios).context("fewer than two rounds")?;
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.0} | {:.3}x | {} | {} | >= {target}x |",
            w.name(),
            median(&mut direct),
            median(&mut st8s),
            r.mean,
            r.interval(),
            r.range()
        );
        if r.lo < target {
            misses.push(format!(
                "{}: a pod through its node's address {:.3}x connecting to the pod directly (95 % CI {}; target >= {target}x)",
                w.name(),
                r.mean,
                r.interval()
            ));
        }
    }
    let _ = writeln!(report);
    drop(lab);
    Ok(())
}

fn parse_duration_ms(s: &str) -> Option<f64> {
    let (num, unit) = s.find(|c: char| c.is_ascii_alphabetic()).map(|i| s.split_at(i))?;
    let v: f64 = num.parse().ok()?;
    Some(match unit {
        "us" => v / 1000.0,
        "ms" => v,
        "s" => v * 1000.0,
        _ => return None,
    })
}

/// ns per packet through BPF_PROG_TEST_RUN, each program against the parse-only baseline.
/// One comparison of the per-packet section: program `a` on packet `pa` against program `b` on
/// packet `pb` (a baseline program on the same packet, or the same program on another packet).
struct PpCase {
    table: PpTable,
    label: &'static str,
    a: &'static str,
    pa: Vec<u8>,
    b: &'static str,
    pb: Vec<u8>,
    /// What each st8s program of the case must return on every repeat of its packet (test runs
    /// reuse one buffer, so a program's own rewrite is what the next repeat sees): XDP_TX for
    /// an XDP program, TC_ACT_REDIRECT for a TC one, unless the case says otherwise.
    want: u32,
}

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const TC_ACT_REDIRECT: u32 = 7;

/// The table a per-packet case is shown in.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum PpTable {
    /// Against the parse-only program.
    ParseOnly,
    /// Against the "parse + one flow lookup" reference (issue 18's targets).
    Reference,
    /// IPv6 against IPv4, the same program (issue 16's target).
    Ipv6,
    /// The idle monitor's check (issue 17's target).
    Monitor,
}

/// A case measured: each side's median ns per packet, the spread of the paired ratios, and each
/// side's instructions per packet when the counting guest ran.
struct PpFigure {
    a_ns: f64,
    b_ns: f64,
    ratio: Spread,
    insns: Option<(u64, u64)>,
}

/// The per-packet section's programs, loaded, over the table they run against, with the cases.
pub struct PerPacket {
    ebpf: aya::Ebpf,
    cases: Vec<PpCase>,
}

impl PerPacket {
    /// Loads the programs of the kernel object `object`, writes the table through the agent's
    /// own writer, and checks that every case's packet takes the path its row names (a row that
    /// returned another verdict would measure another path).
    pub fn load(object: &[u8]) -> anyhow::Result<Self> {
        use aya::{
            Ebpf,
            programs::{SchedClassifier, Xdp},
        };
        use st8s::packet::{Frame, TCP_ACK, TCP_SYN};
        use st8s_common::program_names as pn;
        let mut ebpf = Ebpf::load(object)?;
        for name in [
            pn::UPLINK_XDP,
            pn::PARSE_ONLY_XDP,
            pn::PARSE_LOOKUP_XDP,
            pn::UPLINK_XDP_UNMONITORED,
        ] {
            let p: &mut Xdp = ebpf.program_mut(name).context("program")?.try_into()?;
            p.load()?;
        }
        for name in [pn::UPLINK_TC, pn::POD_TC, pn::PARSE_ONLY_TC] {
            let p: &mut SchedClassifier = ebpf.program_mut(name).context("program")?.try_into()?;
            p.load()?;
        }
        let me = "10.0.0.11";
        per_packet_table(&mut ebpf, me)?;
        let client: Ipv4Addr = "10.0.0.100".parse()?;
        let frame = |src: Ipv4Addr, sport: u16, dst: &str, dport: u16, flags: u8| {
            let mut f = Frame::tcp(src, sport, dst.parse().unwrap_or(Ipv4Addr::UNSPECIFIED), dport);
            f.tcp_flags = flags;
            f.build()
        };
        // Established packets (ACK) are what a flow mostly carries; a SYN also stamps the reverse
        // translation (local) and is shown apart.
        let forwarded = frame(client, 40000, me, 80, TCP_ACK);
        let local = frame(client, 40000, me, 81, TCP_ACK);
        let reply = frame("10.244.1.5".parse()?, 8080, "10.0.0.100", 40000, TCP_ACK);
        // The IPv6 twins: the same segments between the IPv6 addresses of the same hosts.
        let six = |v4: &[u8], src, dst| {
            let mut f = Frame::tcp(
                st8s::packet::src_addr(v4),
                st8s::packet::src_port(v4),
                st8s::packet::dst_addr(v4),
                st8s::packet::dst_port(v4),
            );
            f.tcp_flags = TCP_ACK;
            st8s::packet::Frame6::like(&f, src, dst).build()
        };
        let case = |table, label, a: &'static str, pa: &[u8], b, pb: &[u8]| PpCase {
            table,
            label,
            a,
            pa: pa.to_vec(),
            b,
            pb: pb.to_vec(),
            want: if a == pn::UPLINK_XDP || a == pn::UPLINK_XDP_UNMONITORED {
                XDP_TX
            } else {
                TC_ACT_REDIRECT
            },
        };
        use PpTable::*;
        let (xo, to) = (pn::PARSE_ONLY_XDP, pn::PARSE_ONLY_TC);
        let cases = vec![
            case(
                ParseOnly,
                "uplink XDP, forwarded flow (XDP_TX)",
                pn::UPLINK_XDP,
                &forwarded,
                xo,
                &forwarded,
            ),
            {
                let syn = frame(client, 40000, me, 80, TCP_SYN);
                case(
                    ParseOnly,
                    "uplink XDP, forwarded flow, SYN",
                    pn::UPLINK_XDP,
                    &syn,
                    xo,
                    &syn,
                )
            },
            case(
                ParseOnly,
                "reference: parse + one flow-table lookup, nothing else",
                pn::PARSE_LOOKUP_XDP,
                &forwarded,
                xo,
                &forwarded,
            ),
            {
                let other = frame(client, 40000, me, 22, TCP_ACK);
                PpCase {
                    want: XDP_PASS,
                    ..case(
                        ParseOnly,
                        "uplink XDP, not steered (pass)",
                        pn::UPLINK_XDP,
                        &other,
                        xo,
                        &other,
                    )
                }
            },
            case(
                ParseOnly,
                "uplink TC, local delivery (DNAT + redirect)",
                pn::UPLINK_TC,
                &local,
                to,
                &local,
            ),
            {
                let syn = frame(client, 40000, me, 81, TCP_SYN);
                case(
                    ParseOnly,
                    "uplink TC, local delivery, SYN (stamps the reverse entry)",
                    pn::UPLINK_TC,
                    &syn,
                    to,
                    &syn,
                )
            },
            case(
                ParseOnly,
                "pod TC, reply (SNAT + redirect)",
                pn::POD_TC,
                &reply,
                to,
                &reply,
            ),
            {
                let p = frame(client, 40000, me, 82, TCP_SYN);
                case(
                    ParseOnly,
                    "uplink XDP, forwarded SYN, port with 3 backends",
                    pn::UPLINK_XDP,
                    &p,
                    xo,
                    &p,
                )
            },
            {
                let p = frame(client, 40000, me, 83, TCP_SYN);
                case(
                    ParseOnly,
                    "uplink XDP, forwarded SYN, port with 256 backends",
                    pn::UPLINK_XDP,
                    &p,
                    xo,
                    &p,
                )
            },
            {
                let p = frame(client, 40000, me, 82, TCP_ACK);
                case(
                    ParseOnly,
                    "uplink XDP, forwarded flow, port with 3 backends",
                    pn::UPLINK_XDP,
                    &p,
                    xo,
                    &p,
                )
            },
            {
                let p = frame(client, 40000, me, 83, TCP_ACK);
                case(
                    ParseOnly,
                    "uplink XDP, forwarded flow, port with 256 backends",
                    pn::UPLINK_XDP,
                    &p,
                    xo,
                    &p,
                )
            },
            case(
                Reference,
                "uplink XDP, forwarded flow (XDP_TX)",
                pn::UPLINK_XDP,
                &forwarded,
                pn::PARSE_LOOKUP_XDP,
                &forwarded,
            ),
            case(
                Reference,
                "uplink TC, local delivery (DNAT + redirect)",
                pn::UPLINK_TC,
                &local,
                pn::PARSE_LOOKUP_XDP,
                &forwarded,
            ),
            case(
                Ipv6,
                "uplink XDP, forwarded flow (XDP_TX)",
                pn::UPLINK_XDP,
                &six(&forwarded, PER_PACKET_CLIENT6, PER_PACKET_ME6),
                pn::UPLINK_XDP,
                &forwarded,
            ),
            case(
                Ipv6,
                "uplink TC, local delivery (DNAT + redirect)",
                pn::UPLINK_TC,
                &six(&local, PER_PACKET_CLIENT6, PER_PACKET_ME6),
                pn::UPLINK_TC,
                &local,
            ),
            case(
                Ipv6,
                "pod TC, reply (SNAT + redirect)",
                pn::POD_TC,
                &six(&reply, PER_PACKET_POD6, PER_PACKET_CLIENT6),
                pn::POD_TC,
                &reply,
            ),
            case(
                Monitor,
                "uplink XDP, forwarded flow (XDP_TX)",
                pn::UPLINK_XDP,
                &forwarded,
                pn::UPLINK_XDP_UNMONITORED,
                &forwarded,
            ),
        ];
        let pp = PerPacket { ebpf, cases };
        // Every st8s program of a case (the references are not) on its packet: the verdict the
        // row is about.
        let ours = [
            pn::UPLINK_XDP,
            pn::UPLINK_XDP_UNMONITORED,
            pn::UPLINK_TC,
            pn::POD_TC,
        ];
        for c in &pp.cases {
            for (prog, pkt) in [(c.a, &c.pa), (c.b, &c.pb)] {
                if !ours.contains(&prog) {
                    continue;
                }
                let want = c.want;
                let got = pp.run(prog, pkt, 2)?.return_value;
                if got != want {
                    bail!(
                        "per-packet bench: {prog} on the packet of {:?} returned {got}, not {want}: the row would measure another path",
                        c.label
                    );
                }
            }
        }
        Ok(pp)
    }

    /// `repeat` runs of the program `name` over one packet.
    fn run(&self, name: &str, pkt: &[u8], repeat: u32) -> anyhow::Result<aya::programs::TestRunResult> {
        use aya::programs::Program;
        match self
            .ebpf
            .program(name)
            .with_context(|| format!("program {name}"))?
        {
            Program::Xdp(p) => test_runs(p, pkt, repeat),
            Program::SchedClassifier(p) => test_runs(p, pkt, repeat),
            _ => bail!("{name} is neither an XDP nor a TC program"),
        }
    }

    /// Nanoseconds per packet over 1,000,000 repeats.
    fn ns(&self, name: &str, pkt: &[u8]) -> anyhow::Result<f64> {
        Ok(self.run(name, pkt, 1_000_000)?.duration.as_nanos() as f64)
    }

    /// Both sides alternated 9 times (the machine's noise hits both alike): the median of each
    /// and the spread of the 9 pairwise ratios.
    fn time(&self, c: &PpCase) -> anyhow::Result<(f64, f64, Spread)> {
        let (mut xs, mut ys, mut rs) = (Vec::new(), Vec::new(), Vec::new());
        for _ in 0..9 {
            let (a, b) = (self.ns(c.a, &c.pa)?, self.ns(c.b, &c.pb)?);
            xs.push(a);
            ys.push(b);
            rs.push(a / b);
        }
        let spread = Spread::of(&rs).context("no ratio")?;
        Ok((median(&mut xs), median(&mut ys), spread))
    }

    /// Under QEMU's `-icount shift=0` the guest's clock advances one nanosecond per instruction
    /// executed, so a test run's "nanoseconds per packet" are instructions per packet: the
    /// program's JIT-compiled code, the helpers it calls and the test-run loop around it, on
    /// any machine the same. 10,000 repeats; one run each (the count does not vary).
    pub fn count(&self) -> anyhow::Result<Vec<(u64, u64)>> {
        self.cases
            .iter()
            .map(|c| {
                let n = |p, pkt| -> anyhow::Result<u64> {
                    Ok(self.run(p, pkt, 10_000)?.duration.as_nanos() as u64)
                };
                Ok((n(c.a, &c.pa)?, n(c.b, &c.pb)?))
            })
            .collect()
    }
}

/// The guest side of the instruction count: one `ST8S-INSNS index a b` line per case, in the
/// cases' order, for [`crate::vm::count_instructions`] to read off the console.
pub fn print_instruction_counts(object: &std::path::Path) -> anyhow::Result<()> {
    let obj = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let pp = PerPacket::load(&obj)?;
    for (i, (a, b)) in pp.count()?.into_iter().enumerate() {
        println!("ST8S-INSNS {i} {a} {b}");
    }
    Ok(())
}

/// Runs one side of per-packet case `case` in test runs of 1,000,000 repeats for `length`, on the
/// last CPU as the bench does, so that a sampling profiler sees where its time goes (helpers,
/// map code, the JIT-compiled program). Prints the cases when `case` is out of range.
pub fn profile_case(
    object: &std::path::Path,
    case: usize,
    reference: bool,
    length: Duration,
) -> anyhow::Result<()> {
    let obj = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let pp = PerPacket::load(&obj)?;
    let Some(c) = pp.cases.get(case) else {
        for (i, c) in pp.cases.iter().enumerate() {
            println!("{i}: {:?} {} ({} against {})", c.table, c.label, c.a, c.b);
        }
        bail!("no case {case}: the cases are listed above");
    };
    let (prog, pkt) = if reference { (c.b, &c.pb) } else { (c.a, &c.pa) };
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let _pinned = Pinned::to(cpus - 1)?;
    progress(&format!("profiling {prog} on {:?} for {length:?}", c.label));
    let start = Instant::now();
    let mut runs = 0u64;
    while start.elapsed() < length {
        pp.run(prog, pkt, 1_000_000)?;
        runs += 1;
    }
    progress(&format!("{runs} runs of 1,000,000 packets"));
    Ok(())
}

/// Pins the calling thread to one CPU (and back to all when dropped), so that every per-packet
/// measurement runs where the others did.
struct Pinned(libc::cpu_set_t);

impl Pinned {
    fn to(cpu: usize) -> anyhow::Result<Self> {
        // SAFETY: plain syscalls on a zeroed set owned here; 0 is the calling thread.
        unsafe {
            let mut old: libc::cpu_set_t = std::mem::zeroed();
            if libc::sched_getaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &mut old) != 0 {
                bail!("sched_getaffinity: {}", std::io::Error::last_os_error());
            }
            let mut set: libc::cpu_set_t = std::mem::zeroed();
            libc::CPU_SET(cpu, &mut set);
            if libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &set) != 0 {
                bail!("pinning to CPU {cpu}: {}", std::io::Error::last_os_error());
            }
            Ok(Pinned(old))
        }
    }
}

impl Drop for Pinned {
    fn drop(&mut self) {
        // SAFETY: restores the set read in `to`.
        unsafe {
            libc::sched_setaffinity(0, std::mem::size_of::<libc::cpu_set_t>(), &self.0);
        }
    }
}

/// The per-packet section: every case timed here (pinned to the last CPU), and counted in
/// instructions in a Debian 6.12 guest under QEMU when one can be booted.
fn per_packet(report: &mut String, misses: &mut Vec<String>) -> anyhow::Result<()> {
    progress("per-packet cost: BPF_PROG_TEST_RUN, 1,000,000 repeats per measurement");
    let object = crate::setup::ebpf_object();
    let obj = fs::read(&object).context("kernel programs (cargo xtask build-ebpf)")?;
    let pp = PerPacket::load(&obj)?;
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get());
    let pinned = Pinned::to(cpus - 1)?;
    let mut timed = Vec::new();
    for c in &pp.cases {
        timed.push(pp.time(c)?);
    }
    drop(pinned);
    progress("per-packet cost: counting instructions in a Debian 6.12 guest (QEMU -icount)");
    let (counted, how) = match crate::vm::count_instructions(&object, pp.cases.len()) {
        Ok((release, counts)) => (counts.into_iter().map(Some).collect(), format!("Linux {release}")),
        Err(e) => {
            progress(&format!("instruction count skipped: {e:#}"));
            (vec![None; pp.cases.len()], format!("not counted ({e:#})"))
        }
    };
    let figures: Vec<PpFigure> = timed
        .into_iter()
        .zip(counted)
        .map(|((a_ns, b_ns, ratio), insns)| PpFigure {
            a_ns,
            b_ns,
            ratio,
            insns,
        })
        .collect();
    per_packet_report(report, misses, &pp.cases, &figures, &how);
    Ok(())
}

/// The table the per-packet rows run against, written through the agent's own `MapWriter`.
fn per_packet_table(ebpf: &mut aya::Ebpf, me: &str) -> anyhow::Result<()> {
    use aya::maps::HashMap;
    use st8s::{
        core::{PortId, Proto},
        dataplane::writer::{LocalPod, MapWriter, PortContents},
    };
    use st8s_common::{
        BACKEND_LOCAL, Backend, CONFIG_PREFER_LOCAL, CONFIG_XDP_FORWARDS, Config, LAYOUT_VERSION,
        MAGLEV_SIZE, NodeInfo, RevNatKey, RevNatValue, map_names,
    };
    let be = |a: &str| u32::from(a.parse::<Ipv4Addr>().unwrap_or(Ipv4Addr::UNSPECIFIED)).to_be();
    let peer_mac = [2, 0, 0, 0, 0, 12];
    let self_mac = [2, 0, 0, 0, 0, 11];
    // The table goes in through the agent's own writer.
    let mut writer = MapWriter::new();
    writer.write_config(
        ebpf,
        Config {
            self_addr_be: be(me),
            uplink_ifindex: 2,
            hash_seed: 7,
            flags: CONFIG_PREFER_LOCAL | CONFIG_XDP_FORWARDS,
            self_mac,
            layout: LAYOUT_VERSION,
            broadcast_be: be("10.0.0.255"),
            self_addr6: st8s_common::addr6(PER_PACKET_ME6.octets()),
            self_ll6: [0; 4],
        },
    )?;
    let peer: Ipv4Addr = "10.0.0.12".parse()?;
    writer.write_nodes(
        ebpf,
        [(
            peer,
            NodeInfo {
                mac: peer_mac,
                _pad: [0; 2],
                addr6: [0; 4],
            },
        )]
        .into(),
    )?;
    writer.write_peer_macs(ebpf, [peer_mac].into())?;
    let tcp = |port| PortId {
        port,
        proto: Proto::Tcp,
    };
    // Port 80: remote only (XDP forwarding). The backend node's MAC is this node's own: the
    // forward rewrites the frame to an address this node accepts again, so that every repeat of
    // the one reused packet takes the full forwarded path (the MAC check would otherwise pass it
    // early).
    writer.write_port(
        ebpf,
        tcp(80),
        PortContents {
            backends: vec![Backend {
                node_addr_be: be("10.0.0.12"),
                node_mac: self_mac,
                flags: 0,
                _pad: 0,
            }],
            maglev: vec![0; MAGLEV_SIZE],
            local: None,
            flags: 0,
        },
    )?;
    // Ports 82 and 83: remote, with 3 and with 256 backends (the most a port holds), Maglev rows
    // built by the agent's own code, every backend with this node's MAC (as port 80).
    for (port, n) in [(82u16, 3usize), (83, 256)] {
        let names: Vec<String> = (0..n).map(|i| format!("node{i:03}")).collect();
        let refs: Vec<&str> = names.iter().map(String::as_str).collect();
        writer.write_port(
            ebpf,
            tcp(port),
            PortContents {
                backends: (0..n)
                    .map(|i| Backend {
                        node_addr_be: u32::from(Ipv4Addr::new(
                            10,
                            0,
                            1 + (i / 250) as u8,
                            1 + (i % 250) as u8,
                        ))
                        .to_be(),
                        node_mac: self_mac,
                        flags: 0,
                        _pad: 0,
                    })
                    .collect(),
                maglev: st8s::core::maglev::table(&refs, 7),
                local: None,
                flags: 0,
            },
        )?;
    }
    // Port 81: local, with an identity translation (pod = this node, same port), so that every
    // repetition of the same packet takes the full local path (BPF_PROG_TEST_RUN reuses one
    // packet across repeats).
    writer.write_port(
        ebpf,
        tcp(81),
        PortContents {
            backends: vec![Backend {
                node_addr_be: be(me),
                node_mac: [0; 6],
                flags: BACKEND_LOCAL,
                _pad: 0,
            }],
            maglev: vec![0; MAGLEV_SIZE],
            local: Some(LocalPod {
                addr: me.parse()?,
                addr6: Some(PER_PACKET_ME6),
                port: 81,
                ifindex: 7,
            }),
            flags: 0,
        },
    )?;
    // Its pod's own link known, as the agent finds it behind a bridge or a routed CNI's veth:
    // delivery by `bpf_redirect_peer`, the path a node takes. The pod's MAC is this node's, for
    // the reason above: the repeats see the frame the first run addressed to the pod.
    let slot = writer.slot(tcp(81)).context("port 81's slot")?;
    aya::maps::Array::<_, st8s_common::PodLink>::try_from(
        ebpf.map_mut(map_names::POD_LINKS).context("map")?,
    )?
    .set(
        u32::from(slot),
        st8s_common::PodLink {
            pod_addr_be: be(me),
            ifindex: 7,
            pod_mac: self_mac,
            _pad: [0; 2],
        },
        0,
    )?;
    HashMap::<_, RevNatKey, RevNatValue>::try_from(ebpf.map_mut(map_names::REVNAT).context("map")?)?.insert(
        RevNatKey {
            pod_addr_be: be("10.244.1.5"),
            client_addr_be: be("10.0.0.100"),
            pod_port_be: 8080u16.to_be(),
            client_port_be: 40000u16.to_be(),
            proto: 6,
            _pad: 0,
            _pad2: 0,
        },
        RevNatValue {
            frontend_addr_be: be("10.244.1.5"),
            frontend_port_be: 8080u16.to_be(),
            slot: 1,
            _pad: [0; 8],
            stamp_ns: 0,
        },
        0,
    )?;
    // The IPv6 twin of the reply translation: identity too.
    let pod6 = st8s_common::addr6(PER_PACKET_POD6.octets());
    HashMap::<_, st8s_common::RevNatKey6, st8s_common::RevNatValue6>::try_from(
        ebpf.map_mut(map_names::REVNAT6).context("map")?,
    )?
    .insert(
        st8s_common::RevNatKey6 {
            pod_addr: pod6,
            client_addr: st8s_common::addr6(PER_PACKET_CLIENT6.octets()),
            pod_port_be: 8080u16.to_be(),
            client_port_be: 40000u16.to_be(),
            proto: 6,
            ..Default::default()
        },
        st8s_common::RevNatValue6 {
            frontend_addr: pod6,
            frontend_port_be: 8080u16.to_be(),
            slot: 1,
            ..Default::default()
        },
        0,
    )?;
    Ok(())
}

/// The per-packet table's IPv6 addresses: this node, the client, the pod.
const PER_PACKET_ME6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x11);
const PER_PACKET_CLIENT6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x100);
const PER_PACKET_POD6: std::net::Ipv6Addr = std::net::Ipv6Addr::new(0xfd00, 0x244, 1, 0, 0, 0, 0, 5);

/// The per-packet section: four tables, each case with both sides' medians, the ratio's mean,
/// confidence interval and range, and the instruction counts. A target is met in time only when
/// the whole interval meets it; the instruction counts are judged by the same target apart.
fn per_packet_report(
    report: &mut String,
    misses: &mut Vec<String>,
    cases: &[PpCase],
    figures: &[PpFigure],
    counted: &str,
) {
    let _ = writeln!(report, "## Per-packet cost\n");
    let _ = writeln!(
        report,
        "BPF_PROG_TEST_RUN, 1,000,000 repeats per run, each program alternated 9 times with what it \
         is compared with, pinned to one CPU; each side's median, and the geometric mean of the 9 \
         pairwise ratios with its 95 % confidence interval and their range. Instructions: the same \
         cases in a guest booted under QEMU with `-icount shift=0`, where the clock advances one \
         nanosecond per instruction executed, so a test run's time per packet is its count of x86 \
         instructions (the JIT-compiled program, the helpers it calls and the test-run loop), the \
         same on any machine: {counted}.\n"
    );
    let _ = writeln!(
        report,
        "The local-delivery and reply cases use an identity translation, because test runs reuse \
         one packet: every repeat then takes the full path, less the port-checksum update that an \
         identity port skips. For the same reason the forwarded case's backend node has this \
         node's MAC. Packets are established-flow TCP segments (ACK) unless the row says SYN. The \
         rows with 3 and with 256 backends (the most a port holds) compare a port's size on the \
         same path: a new flow (SYN) picks its backend from the port's 25,601-entry Maglev row, an \
         established one from the flow table.\n"
    );
    let tables: [(PpTable, &str, &str, &str); 4] = [
        (PpTable::ParseOnly, "", "st8s", "parse-only"),
        (
            PpTable::Reference,
            "### Against one flow lookup\n\nThe same programs against the reference that parses \
             the headers and makes one flow-table lookup (`st8s_parse_lookup_xdp`), paired round \
             by round. Targets (issue 18): the XDP forwarded flow <= 1.5x, TC local delivery <= 2.5x.\n",
            "st8s",
            "reference",
        ),
        (
            PpTable::Ipv6,
            "### IPv6 against IPv4\n\nThe same program on the IPv6 twin of the IPv4 segment (same \
             hosts, ports and flags; 24-byte flow keys, the address's checksum share as a difference), \
             paired with the IPv4 one. Target (issue 16): IPv6 within 5 % of IPv4.\n",
            "IPv6",
            "IPv4",
        ),
        (
            PpTable::Monitor,
            "### The monitor, when no one listens\n\n`st8s_uplink_xdp` against \
             `st8s_uplink_xdp_unmonitored` (the same program with the monitor's check compiled \
             out) on the forwarded established flow. Target (issue 17): under 1.05x.\n",
            "with the check",
            "without",
        ),
    ];
    for (table, intro, a, b) in tables {
        if !intro.is_empty() {
            let _ = writeln!(report, "{intro}");
        }
        let _ = writeln!(
            report,
            "| program, case | {a} ns/pkt | {b} ns/pkt | ratio | 95 % CI | range | {a} instructions | {b} instructions | ratio |"
        );
        let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|---:|---:|---:|");
        for (c, f) in cases.iter().zip(figures).filter(|(c, _)| c.table == table) {
            let (ia, ib, ir) = match f.insns {
                Some((x, y)) => (
                    x.to_string(),
                    y.to_string(),
                    format!("{:.2}x", x as f64 / y.max(1) as f64),
                ),
                None => ("-".into(), "-".into(), "-".into()),
            };
            let _ = writeln!(
                report,
                "| {} | {:.1} | {:.1} | {:.2}x | {} | {} | {ia} | {ib} | {ir} |",
                c.label,
                f.a_ns,
                f.b_ns,
                f.ratio.mean,
                f.ratio.interval(),
                f.ratio.range()
            );
            let limit = match (table, c.label) {
                (PpTable::Reference, l) if l.starts_with("uplink XDP") => Some(1.5),
                (PpTable::Reference, _) => Some(2.5),
                (PpTable::Ipv6, _) => Some(1.05),
                (PpTable::Monitor, _) => Some(1.05),
                (PpTable::ParseOnly, _) => None,
            };
            let Some(limit) = limit else { continue };
            if f.ratio.hi > limit {
                misses.push(format!(
                    "per-packet time, {}: {a} {:.2}x {b} (95 % CI {}; target <= {limit}x)",
                    c.label,
                    f.ratio.mean,
                    f.ratio.interval()
                ));
            }
            if let Some((x, y)) = f.insns
                && x as f64 > limit * y as f64
            {
                misses.push(format!(
                    "per-packet instructions, {}: {a} {x} = {:.2}x {b} {y} (target <= {limit}x)",
                    c.label,
                    x as f64 / y.max(1) as f64
                ));
            }
        }
        let _ = writeln!(report);
    }
}

/// `repeat` runs of the program over one packet.
fn test_runs<P>(p: &P, pkt: &[u8], repeat: u32) -> anyhow::Result<aya::programs::TestRunResult>
where
    for<'a> P: aya::programs::TestRun<
            Opts<'a> = aya::programs::TestRunOptions<'a>,
            Result = aya::programs::TestRunResult,
        >,
{
    let mut out = vec![0u8; pkt.len() + 64];
    let mut o = aya::programs::TestRunOptions::new();
    o.data_in = Some(pkt);
    o.data_out = Some(&mut out);
    o.repeat = repeat;
    Ok(p.test_run(o)?)
}
/// Event-to-map latency, full-sync time and agent memory with the API double.
fn control_plane(report: &mut String, misses: &mut Vec<String>) -> anyhow::Result<()> {
    let _ = writeln!(report, "## Control plane\n");
    let _ = writeln!(
        report,
        "One agent (release build, on node1 of the lab) watching the API-server double, which \
         serves N pods (60 with hostPorts over 20 ports and 3 nodes, the rest without, each with \
         a realistic spec) in pages of 500 as kube-rs asks. Full sync = first watch event to the \
         first complete table in the maps (the agent's own gauges; BPF load and verification \
         excluded and shown apart). Event-to-map = 100 pod readiness changes, 20 ms apart, from \
         the watch event's arrival to the map write (the agent's `latency_us`). RSS = VmRSS after \
         the events.\n"
    );
    let _ = writeln!(
        report,
        "| pods | full sync | (list / program) | BPF load | event-to-map p50 | p99 | agent RSS |"
    );
    let _ = writeln!(report, "|---:|---:|---:|---:|---:|---:|---:|");
    for n in [100usize, 1000, 10_000] {
        progress(&format!("control plane: {n} pods"));
        let kubeconfig = std::env::temp_dir().join(format!("st8s-bench-kubeconfig-{}", std::process::id()));
        let mut lab = Lab::new(LabConfig {
            nodes: 3,
            st8s_bin: target_dir().join("release/st8s"),
            xtask_bin: target_dir().join("debug/xtask"),
            prefer_local: true,
            xdp: "auto".into(),
            kubeconfig: Some(kubeconfig.clone()),
            agent_caps: None,
            routed_cni: false,
            dual_stack: false,
        })?;
        let sw = lab.switch_ns().to_owned();
        let listener = in_netns(&sw, || std::net::TcpListener::bind((API_ADDR, 6443)))??;
        let api = ApiServer::start_on(listener)?;
        api.write_kubeconfig(&kubeconfig)?;
        for i in 1..=3 {
            api.apply(
                apiserver::Resource::Node,
                apiserver::node(&format!("node{i}"), &node_addr(i).to_string(), true),
            );
        }
        let host_port_pods: Vec<(String, usize, u16)> = (0..60)
            .map(|i| (format!("hp-{i}"), i % 3 + 1, 20000 + (i / 3) as u16))
            .collect();
        for (name, node, port) in &host_port_pods {
            api.apply(apiserver::Resource::Pod, big_pod(name, *node, Some(*port), true));
        }
        for i in 0..n.saturating_sub(60) {
            api.apply(
                apiserver::Resource::Pod,
                big_pod(&format!("app-{i}"), i % 3 + 1, None, true),
            );
        }
        lab.start_agent(1)?;
        lab.wait_ready(1, Duration::from_secs(120))?;
        let (_, metrics) = lab.agent_http(1, "/metrics")?;
        let gauge = |name: &str| {
            metrics
                .lines()
                .find_map(|l| l.strip_prefix(name))
                .and_then(|v| v.trim().parse::<f64>().ok())
                .unwrap_or(f64::NAN)
        };
        let list = gauge("st8s_initial_list_seconds ");
        let program = gauge("st8s_initial_program_seconds ");
        let load = gauge("st8s_bpf_load_seconds ");
        let log_before = fs::read_to_string(lab.agent_log(1)).unwrap_or_default().len();
        let started = Instant::now();
        for k in 0..100 {
            let (name, node, port) = &host_port_pods[k % host_port_pods.len()];
            // First every hostPort pod turns NotReady, then they come back: each event changes a
            // port's backends.
            api.apply(
                apiserver::Resource::Pod,
                big_pod(name, *node, Some(*port), (k / 60) % 2 == 1),
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        std::thread::sleep(Duration::from_millis(500));
        let log = fs::read_to_string(lab.agent_log(1)).unwrap_or_default();
        let mut lat: Vec<f64> = log[log_before.min(log.len())..]
            .lines()
            .filter(|l| l.contains("maps in sync"))
            .filter_map(|l| {
                l.split("latency_us=")
                    .nth(1)?
                    .split_whitespace()
                    .next()?
                    .parse::<f64>()
                    .ok()
            })
            .map(|us| us / 1000.0)
            .collect();
        lat.sort_by(|a, b| a.total_cmp(b));
        let pct = |q: f64| {
            lat.get(((q * lat.len() as f64).ceil() as usize).saturating_sub(1))
                .copied()
                .unwrap_or(f64::NAN)
        };
        let (p50, p99) = (pct(0.5), pct(0.99));
        let rss_mib = lab
            .agent_pid(1)
            .and_then(|pid| fs::read_to_string(format!("/proc/{pid}/status")).ok())
            .and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("VmRSS:"))
                    .and_then(|v| v.split_whitespace().next()?.parse::<f64>().ok())
            })
            .map(|kb| kb / 1024.0)
            .unwrap_or(f64::NAN);
        let full = list + program;
        let _ = writeln!(
            report,
            "| {n} | {:.0} ms | {:.0} / {:.1} ms | {:.0} ms | {p50:.2} ms | {p99:.2} ms | {rss_mib:.1} MiB |",
            full * 1000.0,
            list * 1000.0,
            program * 1000.0,
            load * 1000.0
        );
        eprintln!(
            "    {n} pods: {} syncs measured over {:?}",
            lat.len(),
            started.elapsed()
        );
        if n == 1000 && (p99.is_nan() || p99 > 50.0) {
            misses.push(format!(
                "event-to-map p99 at 1,000 pods: {p99:.2} ms (target <= 50 ms)"
            ));
        }
        if n == 10_000 && (full.is_nan() || full > 1.0) {
            misses.push(format!(
                "full sync of 10,000 pods: {:.0} ms (target <= 1 s)",
                full * 1000.0
            ));
        }
        if n == 1000 && (rss_mib.is_nan() || rss_mib > 30.0) {
            misses.push(format!(
                "agent RSS at 1,000 pods: {rss_mib:.1} MiB (target <= 30 MiB)"
            ));
        }
        drop(lab);
        drop(api);
        let _ = fs::remove_file(&kubeconfig);
    }
    let _ = writeln!(report);
    Ok(())
}

/// A pod with the bulk of a real one (labels, an image, env, resources, probes).
fn big_pod(name: &str, node: usize, host_port: Option<u16>, ready: bool) -> serde_json::Value {
    let mut ports = vec![json!({"containerPort": 9000, "name": "metrics", "protocol": "TCP"})];
    if let Some(hp) = host_port {
        ports.push(json!({"containerPort": 8080, "hostPort": hp, "protocol": "TCP"}));
    }
    let env: Vec<_> = (0..8)
        .map(|i| json!({"name": format!("SETTING_{i}"), "value": format!("value-{i}-{name}")}))
        .collect();
    json!({
        "metadata": {"name": name, "namespace": "apps", "uid": format!("uid-{name}"),
                     "labels": {"app": name, "tier": "backend", "pod-template-hash": "5d8f9c7b6"},
                     "annotations": {"prometheus.io/scrape": "true", "kubectl.kubernetes.io/restartedAt": "2026-11-01T00:00:00Z"}},
        "spec": {"nodeName": format!("node{node}"), "serviceAccountName": "default",
                 "containers": [{"name": "app", "image": "registry.example.org/apps/app:1.2.3",
                                 "ports": ports, "env": env,
                                 "resources": {"requests": {"cpu": "10m", "memory": "32Mi"}, "limits": {"memory": "128Mi"}},
                                 "readinessProbe": {"httpGet": {"path": "/ready", "port": 9000}, "periodSeconds": 5}}]},
        "status": {"phase": "Running", "podIP": format!("10.244.{node}.{}", 10 + (name.len() % 200)),
                   "conditions": [{"type": "Ready", "status": if ready { "True" } else { "False" }},
                                  {"type": "ContainersReady", "status": "True"}]}
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn pods() -> Pods {
        let v4 = |last| Ipv4Addr::new(10, 244, 1, last);
        Pods {
            v4: [("web", v4(2)), ("dns", v4(3)), ("iperf", v4(4))].into(),
            via3: [("web", v4(102)), ("dns", v4(103)), ("iperf", v4(104))].into(),
            v6: [
                ("web", "fd00:244:1::2".parse().expect("v6")),
                ("dns", "fd00:244:1::3".parse().expect("v6")),
                ("iperf", "fd00:244:1::4".parse().expect("v6")),
            ]
            .into(),
        }
    }

    /// Every path of every workload ends somewhere of its own (an HTTP path on its own nginx
    /// port, see `target`), and the two-hop path on the pod's second address.
    #[test]
    fn each_path_has_its_own_target() {
        let pods = pods();
        for w in [
            Workload::HttpKeepAlive,
            Workload::HttpNewConn,
            Workload::DnsUdp,
            Workload::TcpStream,
        ] {
            let targets: Vec<SocketAddr> = PATHS.iter().filter_map(|p| target(w, p, &pods)).collect();
            let distinct: std::collections::BTreeSet<_> = targets.iter().collect();
            assert_eq!(distinct.len(), targets.len(), "{w:?}: {targets:?}");
            let two_hop = target(w, "direct-2hop", &pods).expect("direct-2hop applies");
            assert!(
                pods.via3.values().any(|a| IpAddr::V4(*a) == two_hop.ip()),
                "{w:?}: {two_hop} is no second address"
            );
        }
    }
}
