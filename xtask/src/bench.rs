//! `cargo xtask bench`: st8s against the paths users have today, side by side in one run.
//!
//! Data path: a release build in the network-namespace lab. Every workload is measured on every
//! path in the same run, alternating the paths round by round, and reported as medians:
//!
//! - `direct`: the client sends to the pod address through plain routing (the limit);
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
    progress, target_dir, workspace_root,
};

#[derive(Clone, Debug)]
pub struct BenchArgs {
    pub rounds: usize,
    pub seconds: u64,
    pub skip_dataplane: bool,
    pub skip_workloads: bool,
    pub skip_control: bool,
    pub skip_local_clients: bool,
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
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Workload {
    HttpKeepAlive,
    HttpNewConn,
    DnsUdp,
    TcpStream,
}

impl Workload {
    fn name(self) -> &'static str {
        match self {
            Workload::HttpKeepAlive => "HTTP keep-alive (wrk, req/s)",
            Workload::HttpNewConn => "HTTP new connection per request (wrk, req/s)",
            Workload::DnsUdp => "DNS over UDP (dnsperf, queries/s)",
            Workload::TcpStream => "TCP stream (iperf3, Gbit/s)",
        }
    }
}

const PATHS: [&str; 11] = [
    "direct",
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
        let (addr, port) = target4(w, v4, &pods.v4)?;
        let addr6 = match pods.v4.iter().find(|(_, a)| **a == addr) {
            Some((name, _)) => pods.v6[name],
            None => node_addr6((1..=3).find(|n| node_addr(*n) == addr)?),
        };
        return Some(SocketAddr::new(IpAddr::V6(addr6), port));
    }
    target4(w, path, &pods.v4).map(|(a, p)| SocketAddr::new(IpAddr::V4(a), p))
}

fn target4(w: Workload, path: &str, pods: &BTreeMap<&str, Ipv4Addr>) -> Option<(Ipv4Addr, u16)> {
    if matches!(w, Workload::HttpKeepAlive | Workload::HttpNewConn) {
        return match path {
            "direct" => Some((pods["web"], 8081)),
            "iptables-fwd" => Some((node_addr(3), 8081)),
            "iptables-local" => Some((node_addr(1), 8081)),
            "haproxy" => Some((node_addr(3), 8082)),
            "st8s-local" => Some((node_addr(1), 80)),
            "st8s-fwd" => Some((node_addr(3), 81)),
            _ => None,
        };
    }
    let (pod, pod_port, host_port, ipt_port, haproxy_port) = match w {
        Workload::HttpKeepAlive | Workload::HttpNewConn => (pods["web"], 8080, 80, 8081, Some(8082)),
        Workload::DnsUdp => (pods["dns"], 53, 53, 5354, None),
        Workload::TcpStream => (pods["iperf"], 5201, 5201, 5202, Some(5203)),
    };
    match path {
        "direct" => Some((pod, pod_port)),
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
    ensure_tools()?;
    let mut report = String::new();
    let machine = machine();
    let _ = writeln!(report, "# st8s benchmarks\n");
    let _ = writeln!(
        report,
        "Produced by `cargo xtask bench --rounds {} --seconds {}` on {} (UTC). Machine: {machine}.\n",
        args.rounds,
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
        per_packet(&mut pp, &mut misses)?;
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
        let _ = writeln!(report, "Every target of issue 4 was met in this run.\n");
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
    data_path_targets(&med, misses);
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
    let listen: String = [8080, 8081, 8082, 8083, 8084, 8086]
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
        command: cmd(&["nginx", "-c", nginx_conf.to_str().unwrap_or_default()]),
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
        command: cmd(&["knotd", "-c", knot_conf.to_str().unwrap_or_default()]),
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
        command: cmd(&["iperf3", "-s", "-p", "5201"]),
    })?;
    let mut pods = Pods {
        v4: BTreeMap::new(),
        v6: BTreeMap::new(),
    };
    for (name, pod) in [
        ("web", "web-node1"),
        ("dns", "dns-node1"),
        ("iperf", "iperf-node1"),
    ] {
        pods.v4.insert(name, lab.pod_ip(pod).context("pod ip")?);
        pods.v6
            .insert(name, lab.pod_ip6(pod).context("pod IPv6 address")?);
    }
    lab.write_cluster()?;
    lab.start_agents()?;
    lab.wait_synced(Duration::from_secs(30))?;
    Ok((lab, pods, queries))
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
                let dnat = [
                    "-A",
                    "PREROUTING",
                    "-p",
                    proto,
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
        .args(["netns", "exec", lab.node_ns(3), "haproxy", "-db", "-f"])
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
    for w in WORKLOADS {
        // Warm every path once (ARP, conntrack, flow tables) before measuring.
        for path in PATHS {
            if let Some(t) = target(w, path, pods) {
                let _ = measure(&client, w, t, "1", queries);
            }
        }
        for round in 0..args.rounds {
            let mut order: Vec<&str> = PATHS.to_vec();
            order.rotate_left(round % PATHS.len());
            for path in order {
                let Some(t) = target(w, path, pods) else { continue };
                progress(&format!(
                    "{} | round {}/{} | {path}",
                    w.name(),
                    round + 1,
                    args.rounds
                ));
                match measure(&client, w, t, &d, queries) {
                    Ok(s) => results.entry((w, path)).or_default().push(Sample { round, ..s }),
                    Err(e) => eprintln!("    {path}: {e:#}"),
                }
            }
        }
    }
    results
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
        "Medians of {} rounds of {} s each, paths alternating. Ratios are to `direct` and to \
         `iptables-fwd` (or `iptables-local` for `st8s-local`); an IPv6 path's (`-v6`, \
         `ip6tables-*`) to `direct-v6` and its `ip6tables` twin. NAT rules sit on node1 and node3 \
         in both families, so both `direct` paths cross conntrack alike. wrk: 1 thread, 32 \
         connections. dnsperf: 10 clients. iperf3: one TCP stream.\n",
        args.rounds, args.seconds
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
        let _ = writeln!(report, "### {}\n", w.name());
        let _ = writeln!(report, "| path | rate | p50 | p99 | vs direct | vs iptables |");
        let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|");
        for path in PATHS {
            let Some((rate, p50, p99)) = med.get(&(w, path)) else {
                continue;
            };
            let (direct, ipt) = baselines(path);
            let direct = med.get(&(w, direct)).map(|m| m.0);
            let base = ipt.and_then(|i| med.get(&(w, i))).map(|m| m.0);
            let shown = if w == Workload::TcpStream {
                format!("{:.2}", rate / 1e9)
            } else {
                format!("{rate:.0}")
            };
            let ms = |v: &Option<f64>| v.map(|v| format!("{v:.2} ms")).unwrap_or_else(|| "-".into());
            let ratio = |b: Option<f64>| {
                b.map(|b| format!("{:.2}x", rate / b))
                    .unwrap_or_else(|| "-".into())
            };
            let _ = writeln!(
                report,
                "| {path} | {shown} | {} | {} | {} | {} |",
                ms(p50),
                ms(p99),
                ratio(direct),
                ratio(base)
            );
        }
        let _ = writeln!(report);
    }
    med
}

/// Issue 16: each st8s IPv6 path against its IPv4 twin, both as ratios to their family's direct
/// path. Rounds are paired: a round's IPv6 ratio over the same round's IPv4 ratio; the median of
/// the pairs is judged (within 5 %) and their range shown.
fn ipv6_report(
    report: &mut String,
    misses: &mut Vec<String>,
    results: &BTreeMap<(Workload, &'static str), Vec<Sample>>,
) {
    let _ = writeln!(report, "### IPv6 against IPv4\n");
    let _ = writeln!(
        report,
        "Each st8s path over IPv6 as a ratio to `direct-v6`, over the same path's IPv4 ratio to \
         `direct`, round by round; the median of the rounds and their range. Target: within 5 % \
         (>= 0.95).\n"
    );
    let _ = writeln!(
        report,
        "| workload | path | IPv4 vs direct | IPv6 vs direct-v6 | IPv6/IPv4 | range |"
    );
    let _ = writeln!(report, "|---|---|---:|---:|---:|---:|");
    let rate = |w: Workload, path: &str, round: usize| {
        results
            .get(&(w, path))?
            .iter()
            .find(|s| s.round == round)
            .map(|s| s.rate)
    };
    let rounds = results
        .values()
        .flat_map(|v| v.iter().map(|s| s.round + 1))
        .max()
        .unwrap_or(0);
    for w in WORKLOADS {
        for (v6, v4) in [("st8s-local-v6", "st8s-local"), ("st8s-fwd-v6", "st8s-fwd")] {
            let (mut r4, mut r6, mut pairs) = (Vec::new(), Vec::new(), Vec::new());
            for round in 0..rounds {
                let (Some(a4), Some(d4), Some(a6), Some(d6)) = (
                    rate(w, v4, round),
                    rate(w, "direct", round),
                    rate(w, v6, round),
                    rate(w, "direct-v6", round),
                ) else {
                    continue;
                };
                r4.push(a4 / d4);
                r6.push(a6 / d6);
                pairs.push((a6 / d6) / (a4 / d4));
            }
            if pairs.is_empty() {
                continue;
            }
            let lo = pairs.iter().copied().fold(f64::INFINITY, f64::min);
            let hi = pairs.iter().copied().fold(f64::NEG_INFINITY, f64::max);
            let m = median(&mut pairs);
            let _ = writeln!(
                report,
                "| {} | {v6} | {:.2}x | {:.2}x | {m:.2} | {lo:.2}-{hi:.2} |",
                w.name(),
                median(&mut r4),
                median(&mut r6)
            );
            if m < 0.95 {
                misses.push(format!(
                    "{}: {v6} {m:.2} of {v4}, as ratios to direct routing (target >= 0.95)",
                    w.name()
                ));
            }
        }
    }
    let _ = writeln!(report);
}

/// The data path's targets, judged on the medians.
fn data_path_targets(med: &BTreeMap<(Workload, &'static str), Medians>, misses: &mut Vec<String>) {
    let get = |w, p| med.get(&(w, p)).copied();
    let mut check = |ok: bool, what: String| {
        if !ok {
            misses.push(what);
        }
    };
    for w in [Workload::HttpKeepAlive, Workload::HttpNewConn] {
        if let (Some(f), Some(d), Some(i)) = (get(w, "st8s-fwd"), get(w, "direct"), get(w, "iptables-fwd")) {
            check(
                f.0 >= 0.95 * d.0,
                format!(
                    "{}: forwarded {:.2}x direct (target >= 0.95x)",
                    w.name(),
                    f.0 / d.0
                ),
            );
            check(
                f.0 >= 1.2 * i.0,
                format!(
                    "{}: forwarded {:.2}x iptables (target >= 1.2x)",
                    w.name(),
                    f.0 / i.0
                ),
            );
            if let (Some(fp), Some(dp)) = (f.2, d.2) {
                check(
                    fp <= 1.1 * dp,
                    format!(
                        "{}: forwarded p99 {:.2}x direct (target <= 1.1x)",
                        w.name(),
                        fp / dp
                    ),
                );
            }
        }
        if let (Some(l), Some(d)) = (get(w, "st8s-local"), get(w, "direct")) {
            check(
                l.0 >= 0.97 * d.0,
                format!("{}: local {:.2}x direct (target >= 0.97x)", w.name(), l.0 / d.0),
            );
        }
    }
    if let (Some(f), Some(d)) = (get(Workload::DnsUdp, "st8s-fwd"), get(Workload::DnsUdp, "direct")) {
        check(
            f.0 >= 0.95 * d.0,
            format!(
                "DNS over UDP: forwarded {:.2}x direct (target >= 0.95x)",
                f.0 / d.0
            ),
        );
    }
}

fn measure(
    client: &str,
    w: Workload,
    to: SocketAddr,
    secs: &str,
    queries: &std::path::Path,
) -> anyhow::Result<Sample> {
    let exec = |args: &[&str]| -> anyhow::Result<String> {
        sh_ok(Command::new("ip").args(["netns", "exec", client]).args(args))
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
        command: Some(
            [
                "taskset",
                "-c",
                "1",
                "nginx",
                "-c",
                nginx_conf.to_str().unwrap_or_default(),
            ]
            .map(String::from)
            .to_vec(),
        ),
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
         to the pod. {} paired rounds of {} s, the order alternating; the ratio is st8s/direct per \
         round.\n",
        args.rounds, args.seconds
    );
    let _ = writeln!(
        report,
        "| workload | direct | st8s | ratio (median) | ratio (min-max) | target |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|---:|---:|");
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
        let lo = ratios.iter().copied().fold(f64::INFINITY, f64::min);
        let hi = ratios.iter().copied().fold(f64::NEG_INFINITY, f64::max);
        let r = median(&mut ratios);
        let _ = writeln!(
            report,
            "| {} | {:.0} | {:.0} | {r:.3}x | {lo:.3}-{hi:.3}x | >= {target}x |",
            w.name(),
            median(&mut direct),
            median(&mut st8s)
        );
        if r < target {
            misses.push(format!(
                "{}: a pod through its node's address {r:.3}x connecting to the pod directly (target >= {target}x)",
                w.name()
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
fn per_packet(report: &mut String, misses: &mut Vec<String>) -> anyhow::Result<()> {
    use aya::{
        Ebpf,
        programs::{SchedClassifier, Xdp},
    };
    use st8s::packet::{Frame, TCP_ACK, TCP_SYN};
    use st8s_common::program_names as pn;
    progress("per-packet cost: BPF_PROG_TEST_RUN, 1,000,000 repeats per measurement");
    let obj = fs::read(crate::setup::ebpf_object()).context("kernel programs (cargo xtask build-ebpf)")?;
    let mut ebpf = Ebpf::load(&obj)?;
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
    let forwarded_syn = frame(client, 40000, me, 80, TCP_SYN);
    let local = frame(client, 40000, me, 81, TCP_ACK);
    let local_syn = frame(client, 40000, me, 81, TCP_SYN);
    let other = frame(client, 40000, me, 22, TCP_ACK);
    let three_syn = frame(client, 40000, me, 82, TCP_SYN);
    let many_syn = frame(client, 40000, me, 83, TCP_SYN);
    let three = frame(client, 40000, me, 82, TCP_ACK);
    let many = frame(client, 40000, me, 83, TCP_ACK);
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
    let forwarded6 = six(&forwarded, PER_PACKET_CLIENT6, PER_PACKET_ME6);
    let local6 = six(&local, PER_PACKET_CLIENT6, PER_PACKET_ME6);
    let reply6 = six(&reply, PER_PACKET_POD6, PER_PACKET_CLIENT6);

    let xdp = |n: &str| -> anyhow::Result<&Xdp> { Ok(ebpf.program(n).context("program")?.try_into()?) };
    let tc =
        |n: &str| -> anyhow::Result<&SchedClassifier> { Ok(ebpf.program(n).context("program")?.try_into()?) };
    // XDP_TX = 3, XDP_PASS = 2, TC_ACT_REDIRECT = 7.
    for (what, got, want) in [
        (
            "uplink XDP, forwarded",
            verdict(xdp(pn::UPLINK_XDP)?, &forwarded)?,
            3,
        ),
        (
            "uplink XDP, forwarded SYN",
            verdict(xdp(pn::UPLINK_XDP)?, &forwarded_syn)?,
            3,
        ),
        (
            "uplink XDP, not steered",
            verdict(xdp(pn::UPLINK_XDP)?, &other)?,
            2,
        ),
        (
            "uplink TC, local delivery",
            verdict(tc(pn::UPLINK_TC)?, &local)?,
            7,
        ),
        (
            "uplink TC, local delivery SYN",
            verdict(tc(pn::UPLINK_TC)?, &local_syn)?,
            7,
        ),
        ("pod TC, reply", verdict(tc(pn::POD_TC)?, &reply)?, 7),
        (
            "uplink XDP without the monitor, forwarded",
            verdict(xdp(pn::UPLINK_XDP_UNMONITORED)?, &forwarded)?,
            3,
        ),
        (
            "IPv6 uplink XDP, forwarded",
            verdict(xdp(pn::UPLINK_XDP)?, &forwarded6)?,
            3,
        ),
        (
            "IPv6 uplink TC, local delivery",
            verdict(tc(pn::UPLINK_TC)?, &local6)?,
            7,
        ),
        ("IPv6 pod TC, reply", verdict(tc(pn::POD_TC)?, &reply6)?, 7),
        ("3 backends, SYN", verdict(xdp(pn::UPLINK_XDP)?, &three_syn)?, 3),
        ("256 backends, SYN", verdict(xdp(pn::UPLINK_XDP)?, &many_syn)?, 3),
        ("3 backends", verdict(xdp(pn::UPLINK_XDP)?, &three)?, 3),
        ("256 backends", verdict(xdp(pn::UPLINK_XDP)?, &many)?, 3),
    ] {
        if got != want {
            bail!("per-packet bench: {what} returned {got}, not {want}: the row would measure another path");
        }
    }
    let rows = [
        (
            "uplink XDP, forwarded flow (XDP_TX)",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &forwarded)?,
        ),
        (
            "uplink XDP, forwarded flow, SYN",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &forwarded_syn)?,
        ),
        (
            "reference: parse + one flow-table lookup, nothing else",
            pair(xdp(pn::PARSE_LOOKUP_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &forwarded)?,
        ),
        (
            "uplink XDP, not steered (pass)",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &other)?,
        ),
        (
            "uplink TC, local delivery (DNAT + redirect)",
            pair(tc(pn::UPLINK_TC)?, tc(pn::PARSE_ONLY_TC)?, &local)?,
        ),
        (
            "uplink TC, local delivery, SYN (stamps the reverse entry)",
            pair(tc(pn::UPLINK_TC)?, tc(pn::PARSE_ONLY_TC)?, &local_syn)?,
        ),
        (
            "pod TC, reply (SNAT + redirect)",
            pair(tc(pn::POD_TC)?, tc(pn::PARSE_ONLY_TC)?, &reply)?,
        ),
        (
            "uplink XDP, forwarded SYN, port with 3 backends",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &three_syn)?,
        ),
        (
            "uplink XDP, forwarded SYN, port with 256 backends",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &many_syn)?,
        ),
        (
            "uplink XDP, forwarded flow, port with 3 backends",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &three)?,
        ),
        (
            "uplink XDP, forwarded flow, port with 256 backends",
            pair(xdp(pn::UPLINK_XDP)?, xdp(pn::PARSE_ONLY_XDP)?, &many)?,
        ),
    ];
    per_packet_report(report, misses, rows);
    let rows6 = [
        (
            "uplink XDP, forwarded flow (XDP_TX)",
            pair_packets(xdp(pn::UPLINK_XDP)?, &forwarded6, &forwarded)?,
        ),
        (
            "uplink TC, local delivery (DNAT + redirect)",
            pair_packets(tc(pn::UPLINK_TC)?, &local6, &local)?,
        ),
        (
            "pod TC, reply (SNAT + redirect)",
            pair_packets(tc(pn::POD_TC)?, &reply6, &reply)?,
        ),
    ];
    per_packet_ipv6_report(report, misses, rows6);
    let quiet = pair(xdp(pn::UPLINK_XDP)?, xdp(pn::UPLINK_XDP_UNMONITORED)?, &forwarded)?;
    per_packet_monitor_report(report, misses, quiet);
    Ok(())
}

/// What the monitor costs when no one listens (issue 17's target: under 5 % of the forwarded
/// path's per-packet time): the program against itself with the monitor compiled out.
fn per_packet_monitor_report(
    report: &mut String,
    misses: &mut Vec<String>,
    (with, without, ratio): (f64, f64, f64),
) {
    let _ = writeln!(
        report,
        "### The monitor, when no one listens
"
    );
    let _ = writeln!(
        report,
        "`st8s_uplink_xdp` against `st8s_uplink_xdp_unmonitored` (the same program with the \
         monitor's check compiled out) on the forwarded established flow, alternated 9 times; \
         medians and the median of the pairwise ratios. Target: under 1.05x.\n"
    );
    let _ = writeln!(
        report,
        "| case | with the check ns/pkt | without ns/pkt | ratio |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|");
    let _ = writeln!(
        report,
        "| uplink XDP, forwarded flow (XDP_TX) | {with:.1} | {without:.1} | {ratio:.2}x |\n"
    );
    if ratio >= 1.05 {
        misses.push(format!(
            "per-packet cost of the idle monitor: {ratio:.2}x the program without it (target < 1.05x)"
        ));
    }
}

/// IPv6 against IPv4 on the same program and path (issue 16's target: within 5 %).
fn per_packet_ipv6_report(report: &mut String, misses: &mut Vec<String>, rows: [(&str, (f64, f64, f64)); 3]) {
    let _ = writeln!(
        report,
        "### IPv6 against IPv4
"
    );
    let _ = writeln!(
        report,
        "The same program on the IPv6 twin of the IPv4 segment (same hosts, ports and flags; \
         40-byte keys, the address's checksum share as a difference), alternated 9 times with the \
         IPv4 one; medians and the median of the pairwise ratios. Target: IPv6 within 5 % of IPv4.\n"
    );
    let _ = writeln!(report, "| program, case | IPv6 ns/pkt | IPv4 ns/pkt | ratio |");
    let _ = writeln!(report, "|---|---:|---:|---:|");
    for (what, (v6, v4, ratio)) in rows {
        let _ = writeln!(report, "| {what} | {v6:.1} | {v4:.1} | {ratio:.2}x |");
        if ratio > 1.05 {
            misses.push(format!(
                "per-packet cost, IPv6 {what}: {ratio:.2}x IPv4 (target <= 1.05x)"
            ));
        }
    }
    let _ = writeln!(report);
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

/// The rows as a report section; rows over 1.5x their baseline (the reference aside) are misses.
fn per_packet_report(report: &mut String, misses: &mut Vec<String>, rows: [(&str, (f64, f64, f64)); 11]) {
    let _ = writeln!(report, "## Per-packet cost\n");
    let _ = writeln!(
        report,
        "BPF_PROG_TEST_RUN, 1,000,000 repeats per run, each program alternated 9 times with its \
         baseline (a program that parses the same headers and returns); medians, and the median of \
         the 9 pairwise ratios. The local-delivery and reply cases use an identity \
         translation, because test runs reuse one packet: every repeat then takes the full path, \
         less the port-checksum update that an identity port skips. For the same reason the forwarded \
         case's backend node has this node's MAC. Packets are established-flow \
         TCP segments (ACK) unless the row says SYN. The rows with 3 and with 256 backends (the most \
         a port holds) compare a port's size on the same path: a new flow (SYN) picks its backend \
         from the port's 25,601-entry Maglev row, an established one from the flow table.\n"
    );
    let _ = writeln!(
        report,
        "| program, case | st8s ns/pkt | parse-only ns/pkt | ratio |"
    );
    let _ = writeln!(report, "|---|---:|---:|---:|");
    for (what, (st8s, base, ratio)) in rows {
        let _ = writeln!(report, "| {what} | {st8s:.1} | {base:.1} | {ratio:.2}x |");
        if ratio > 1.5 && !what.starts_with("reference") {
            misses.push(format!(
                "per-packet cost, {what}: {ratio:.2}x parse-only (target <= 1.5x)"
            ));
        }
    }
    let _ = writeln!(report);
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
fn once<P>(p: &P, pkt: &[u8]) -> anyhow::Result<f64>
where
    for<'a> P: aya::programs::TestRun<
            Opts<'a> = aya::programs::TestRunOptions<'a>,
            Result = aya::programs::TestRunResult,
        >,
{
    Ok(test_runs(p, pkt, 1_000_000)?.duration.as_nanos() as f64)
}
/// The program's verdict on a repeat of the same packet (test runs reuse one buffer, so a
/// program's own rewrite is what the next repeat sees): a row measures the path it names
/// only if every repeat takes it.
fn verdict<P>(p: &P, pkt: &[u8]) -> anyhow::Result<u32>
where
    for<'a> P: aya::programs::TestRun<
            Opts<'a> = aya::programs::TestRunOptions<'a>,
            Result = aya::programs::TestRunResult,
        >,
{
    Ok(test_runs(p, pkt, 2)?.return_value)
}
/// Alternates the program and its baseline 9 times (the VM's noise hits both alike) and
/// returns the medians of each and of the pairwise ratios.
fn pair<A, B>(a: &A, b: &B, pkt: &[u8]) -> anyhow::Result<(f64, f64, f64)>
where
    for<'x> A: aya::programs::TestRun<
            Opts<'x> = aya::programs::TestRunOptions<'x>,
            Result = aya::programs::TestRunResult,
        >,
    for<'x> B: aya::programs::TestRun<
            Opts<'x> = aya::programs::TestRunOptions<'x>,
            Result = aya::programs::TestRunResult,
        >,
{
    alternate(|| once(a, pkt), || once(b, pkt))
}

/// Runs `x` and `y` in turn 9 times; the medians of each and of the pairwise ratios.
fn alternate(
    mut x: impl FnMut() -> anyhow::Result<f64>,
    mut y: impl FnMut() -> anyhow::Result<f64>,
) -> anyhow::Result<(f64, f64, f64)> {
    let (mut xs, mut ys, mut rs) = (Vec::new(), Vec::new(), Vec::new());
    for _ in 0..9 {
        let (a, b) = (x()?, y()?);
        xs.push(a);
        ys.push(b);
        rs.push(a / b);
    }
    Ok((median(&mut xs), median(&mut ys), median(&mut rs)))
}

/// [`pair`] for one program on two packets.
fn pair_packets<P>(p: &P, a: &[u8], b: &[u8]) -> anyhow::Result<(f64, f64, f64)>
where
    for<'x> P: aya::programs::TestRun<
            Opts<'x> = aya::programs::TestRunOptions<'x>,
            Result = aya::programs::TestRunResult,
        >,
{
    alternate(|| once(p, a), || once(p, b))
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
