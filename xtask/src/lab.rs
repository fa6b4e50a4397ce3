//! The network-namespace lab: a simulated home LAN on one machine.
//!
//! ```text
//!                       switch netns: bridge br0 (the LAN, 10.77.0.0/24)
//!        +----------------+-----------------+-----------------+
//!     client           node1              node2             node3        (one netns each)
//!   10.77.0.100     eth0 10.77.0.11     eth0 10.77.0.12     eth0 10.77.0.13
//!                   cni0 10.244.1.1     cni0 10.244.2.1     cni0 10.244.3.1   (pod bridge)
//!                     |                   |                   |
//!                   pods 10.244.1.x       pods 10.244.2.x     pods 10.244.3.x (one netns each)
//! ```
//!
//! Nodes route each other's pod networks (host-gw, like flannel's host-gw backend); the client
//! knows nothing of pod networks. Each node runs a real `st8s agent` on its eth0; each pod runs a
//! real HTTP and/or DNS server. The switch side of every node's veth carries an `XDP_PASS` stub,
//! because the kernel drops frames sent with `XDP_TX` out of a veth whose peer has no XDP program
//! (a property of veth, not of physical NICs); the client's switch port carries one too. The
//! LAN's veths otherwise behave like NIC ports: full checksums on the wire, receive in NAPI
//! (with GRO on the hosts' ends, as NIC drivers do; the switch's ports get NAPI from the stub),
//! and a queue in front of each ([`host_port`]), so that a flow keeps its order and a burst waits
//! instead of being dropped.
//!
//! Everything is created with unique names and torn down on drop, even when a test fails.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::Write as _,
    fs,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    path::{Path, PathBuf},
    process::{Child, Command, Output, Stdio},
    sync::atomic::{AtomicU32, Ordering},
    thread,
    time::{Duration, Instant},
};

use anyhow::{Context as _, bail};

static NEXT_LAB: AtomicU32 = AtomicU32::new(0);

pub const CLIENT_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 100);
/// The LAN address of the switch namespace, where an API-server double can listen.
pub const API_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
pub const NAMESPACE: &str = "lab";

pub fn node_addr(node: usize) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + node as u8)
}

/// A node's IPv6 address on a dual-stack lab (a ULA prefix, as home labs number their LANs).
pub fn node_addr6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x10 + node as u16)
}

pub const CLIENT_ADDR6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x77, 0, 0, 0, 0, 0, 0x100);

/// A node's pod subnet on a dual-stack lab, `/64`.
pub fn pod_prefix6(node: usize) -> Ipv6Addr {
    Ipv6Addr::new(0xfd00, 0x244, node as u16, 0, 0, 0, 0, 0)
}

pub fn node_name(node: usize) -> String {
    format!("node{node}")
}

#[derive(Clone, Debug)]
pub struct LabConfig {
    pub nodes: usize,
    pub st8s_bin: PathBuf,
    pub xtask_bin: PathBuf,
    pub prefer_local: bool,
    pub xdp: String,
    /// Agents watch this API (a kubeconfig) instead of reading the lab's cluster file.
    pub kubeconfig: Option<PathBuf>,
    /// Run the agents with only these capabilities (names as in a Pod's securityContext, e.g.
    /// `BPF`), as root, the way the DaemonSet runs them. `None`: every capability.
    pub agent_caps: Option<Vec<String>>,
    /// The pod network as a routed CNI builds it (Calico's shape): no bridge; each pod's veth
    /// has a /32 route on its node, and the pod reaches the node through a link-local gateway
    /// that the node answers by proxy ARP. Otherwise a `cni0` bridge (flannel's, k3s's).
    pub routed_cni: bool,
    /// Dual-stack: IPv6 (ULA) on every node, pod and the client besides IPv4, the nodes' IPv6
    /// InternalIP and the pods' IPv6 podIPs in the cluster file.
    pub dual_stack: bool,
}

/// The number of a capability named as in a Pod's securityContext (`NET_ADMIN`), for the ones
/// an eBPF agent may need.
pub fn capability_number(name: &str) -> Option<u32> {
    Some(match name.trim_start_matches("CAP_") {
        "CHOWN" => 0,
        "DAC_OVERRIDE" => 1,
        "NET_BIND_SERVICE" => 10,
        "NET_BROADCAST" => 11,
        "NET_ADMIN" => 12,
        "NET_RAW" => 13,
        "IPC_LOCK" => 14,
        "SYS_PTRACE" => 19,
        "SYS_ADMIN" => 21,
        "SYS_RESOURCE" => 24,
        "PERFMON" => 38,
        "BPF" => 39,
        _ => return None,
    })
}

/// One hostPort a pod declares.
#[derive(Clone, Debug)]
pub struct HostPort {
    pub host: u16,
    pub container: u16,
    pub proto: &'static str,
}

#[derive(Clone, Debug)]
pub struct PodSpec {
    pub name: String,
    pub node: usize,
    pub ports: Vec<HostPort>,
    pub http: Option<u16>,
    pub dns: Option<u16>,
    /// UDP discovery ports: published as hostPorts (same port in the pod), declared in the
    /// `st8s.io/discovery` annotation, and answered by the backend.
    pub discovery: Vec<u16>,
    /// Run this server instead of the lab backend (benchmarks use nginx, knotd, iperf3).
    pub command: Option<Vec<String>>,
}

impl PodSpec {
    /// An HTTP server on 8080 published as hostPort 80.
    pub fn web(name: &str, node: usize) -> Self {
        PodSpec {
            name: name.into(),
            node,
            ports: vec![HostPort {
                host: 80,
                container: 8080,
                proto: "TCP",
            }],
            http: Some(8080),
            dns: None,
            discovery: Vec::new(),
            command: None,
        }
    }

    /// A DNS server on 53 udp+tcp published as hostPort 53.
    pub fn dns(name: &str, node: usize) -> Self {
        PodSpec {
            name: name.into(),
            node,
            ports: vec![
                HostPort {
                    host: 53,
                    container: 53,
                    proto: "UDP",
                },
                HostPort {
                    host: 53,
                    container: 53,
                    proto: "TCP",
                },
            ],
            http: None,
            dns: Some(53),
            discovery: Vec::new(),
            command: None,
        }
    }
}

impl PodSpec {
    /// A media server's discovery ports (e.g. 7359 and 1900), without hostNetwork.
    pub fn discovery(name: &str, node: usize, ports: &[u16]) -> Self {
        PodSpec {
            name: name.into(),
            node,
            ports: ports
                .iter()
                .map(|&p| HostPort {
                    host: p,
                    container: p,
                    proto: "UDP",
                })
                .collect(),
            http: None,
            dns: None,
            discovery: ports.to_vec(),
            command: None,
        }
    }
}

struct Pod {
    spec: PodSpec,
    ns: String,
    ip: Ipv4Addr,
    /// Its IPv6 address on a dual-stack lab.
    ip6: Option<Ipv6Addr>,
    node_if: String,
    server: Child,
}

/// What a backend answered.
#[derive(Clone, Debug, Default)]
pub struct Answer {
    pub ok: bool,
    /// `namespace/name` of the pod that answered.
    pub pod: Option<String>,
    /// The client address the pod saw, `ip:port`.
    pub client: Option<String>,
    /// The bytes of an upload the pod received (`upload_to`).
    pub received: Option<u64>,
    pub detail: String,
}

impl Answer {
    pub fn client_ip(&self) -> Option<Ipv4Addr> {
        match self.client_addr()? {
            IpAddr::V4(a) => Some(a),
            IpAddr::V6(_) => None,
        }
    }

    /// The client address the pod saw, of either family.
    pub fn client_addr(&self) -> Option<IpAddr> {
        self.client.as_deref()?.parse::<SocketAddr>().ok().map(|s| s.ip())
    }

    /// No answer, and why.
    fn failed(detail: String) -> Self {
        Answer {
            detail,
            ..Answer::default()
        }
    }

    fn parse(out: &Output) -> Self {
        let text = String::from_utf8_lossy(&out.stdout)
            .trim()
            .trim_matches('"')
            .to_owned();
        let err = String::from_utf8_lossy(&out.stderr).trim().to_owned();
        let field = |k: &str| {
            text.split_whitespace()
                .find_map(|w| w.strip_prefix(k))
                .map(|v| v.trim_matches('"').to_owned())
        };
        let pod = field("pod=");
        Answer {
            ok: out.status.success() && pod.is_some(),
            pod,
            client: field("client="),
            received: field("received=").and_then(|v| v.parse().ok()),
            detail: if text.is_empty() { err } else { text },
        }
    }
}

pub struct Lab {
    pub id: String,
    pub dir: PathBuf,
    pub pin_root: PathBuf,
    cfg: LabConfig,
    netns: Vec<String>,
    sw: String,
    client: String,
    nodes: Vec<String>,
    pods: BTreeMap<String, Pod>,
    next_if: usize,
    agents: BTreeMap<usize, Child>,
    /// Pods written to the cluster file as not Ready (still running).
    unready: Vec<String>,
    /// Each node's cgroup v2 directory, under the lab's own: what a node's root cgroup is on a
    /// real machine (its processes and its pods, where the agent's socket hooks attach). None
    /// without cgroup v2: the agents then steer no local clients.
    cgroup_root: Option<PathBuf>,
    /// `--cgroup` for a node's agent instead of the node's own cgroup.
    agent_cgroup: BTreeMap<usize, String>,
    /// Extra arguments for every agent started from now on.
    agent_args: Vec<String>,
    /// Pods written with a `deletionTimestamp` (deleted, still Ready, in their grace period).
    terminating: Vec<String>,
    /// Nodes whose address sits on a VLAN subinterface of eth0 (see [`Lab::uplink_on_vlan`]).
    vlan_uplinks: BTreeMap<usize, String>,
}

/// The lab's cgroup v2 directory name for a lab id (`<pid>-<n>`).
fn lab_cgroup_name(id: &str) -> String {
    format!("st8s-lab-{id}")
}

/// Kills every process in a cgroup directory and its children, then removes them.
fn remove_cgroup_tree(dir: &Path) {
    if let Ok(entries) = fs::read_dir(dir) {
        for e in entries.flatten() {
            if e.path().is_dir() {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    for _ in 0..50 {
        let procs = fs::read_to_string(dir.join("cgroup.procs")).unwrap_or_default();
        if procs.trim().is_empty() {
            break;
        }
        for p in procs.split_whitespace() {
            if let Ok(pid) = p.parse::<i32>() {
                // SAFETY: kill(2) on a process inside the lab's own cgroup.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
        thread::sleep(Duration::from_millis(20));
    }
    // A parent whose children were just removed stays busy until the kernel has released them.
    for _ in 0..100 {
        if fs::remove_dir(dir).is_ok() || !dir.exists() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
}

/// An IPv6 address on a lab interface, usable at once (`nodad`: no duplicate address detection
/// to wait for on a LAN the lab numbered itself).
fn add6(ns: &str, addr: &str, dev: &str) -> anyhow::Result<()> {
    ip(&["-n", ns, "-6", "addr", "add", addr, "dev", dev, "nodad"])
}

fn ip(args: &[&str]) -> anyhow::Result<()> {
    sh("ip", args)
}

/// Makes a host's end of a LAN link (a veth) behave like a NIC port: it receives in NAPI with
/// GRO, as NIC drivers do, and sends through a queue ([`queue`]).
///
/// A veth without NAPI hands each frame to the backlog of the CPU that sent it, so a TCP flow
/// that its sender transmits from two CPUs (the writer's, and the one its ACKs arrive on)
/// reaches the receiver out of order, which a wire never does. Measured in the bench's lab
/// (iperf3, 4 s, client on CPU 0, server on CPU 1): 8,000-10,000 out-of-order segments at the
/// receiver and 2,000-3,400 retransmissions per run through `st8s-local` over IPv6, none with
/// the client on the server's CPU. The switch's ports get NAPI from the `XDP_PASS` stub
/// instead, without GRO: a switch forwards frames as they come, and a frame GRO merged and the
/// bridge split again would leave with a partial checksum, which `XDP_TX` does not carry.
fn host_port(ns: &str, dev: &str) -> anyhow::Result<()> {
    sh("ip", &["netns", "exec", ns, "ethtool", "-K", dev, "gro", "on"])?;
    queue(ns, dev)
}

/// A queue in front of a LAN port (pfifo_fast, the kernel's default for a NIC), so that a full
/// receive ring on the other end holds the sender back instead of dropping: with NAPI and
/// veth's default `noqueue`, the client's veth dropped about as many frames as it then
/// retransmitted; with a queue, none (Linux 6.18).
fn queue(ns: &str, dev: &str) -> anyhow::Result<()> {
    sh(
        "tc",
        &["-n", ns, "qdisc", "replace", "dev", dev, "root", "pfifo_fast"],
    )
}

fn sh(cmd: &str, args: &[&str]) -> anyhow::Result<()> {
    let out = Command::new(cmd)
        .args(args)
        .output()
        .with_context(|| format!("running {cmd}"))?;
    if !out.status.success() {
        bail!(
            "{cmd} {} failed: {}",
            args.join(" "),
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(())
}

/// Namespaces left by labs whose process is gone (a run killed before it could clean up, or a
/// `--keep` lab): their processes are killed, their namespaces and pins removed.
fn remove_stale() {
    remove_labs(|pid| !Path::new(&format!("/proc/{pid}")).exists());
}

/// Removes every lab on this machine (`cargo xtask lab --down`).
pub fn remove_all() -> usize {
    remove_labs(|_| true)
}

fn remove_labs(select: impl Fn(u32) -> bool) -> usize {
    let Ok(out) = Command::new("ip").args(["netns", "list"]).output() else {
        return 0;
    };
    let mut removed = 0;
    for line in String::from_utf8_lossy(&out.stdout).lines() {
        let name = line.split_whitespace().next().unwrap_or("");
        let Some(rest) = name.strip_prefix("s8-") else {
            continue;
        };
        let Some(pid) = rest.split('-').next().and_then(|p| p.parse::<u32>().ok()) else {
            continue;
        };
        if !select(pid) {
            continue;
        }
        if let Ok(pids) = Command::new("ip").args(["netns", "pids", name]).output() {
            for p in String::from_utf8_lossy(&pids.stdout).split_whitespace() {
                if let Ok(p) = p.parse::<i32>() {
                    // SAFETY: kill(2) on a process inside the lab's own namespace.
                    unsafe { libc::kill(p, libc::SIGKILL) };
                }
            }
        }
        let _ = Command::new("ip").args(["netns", "del", name]).status();
        let _ = fs::remove_dir_all(format!("/sys/fs/bpf/st8s-lab-{pid}"));
        removed += 1;
    }
    // Their cgroups (named after the same pid).
    if let Ok(Some(root)) = st8s::dataplane::net::cgroup2_mount()
        && let Ok(entries) = fs::read_dir(&root)
    {
        for e in entries.flatten() {
            let name = e.file_name().to_string_lossy().into_owned();
            let pid = name
                .strip_prefix("st8s-lab-")
                .and_then(|rest| rest.split('-').next())
                .and_then(|p| p.parse::<u32>().ok());
            if pid.is_some_and(&select) {
                remove_cgroup_tree(&e.path());
            }
        }
    }
    removed
}

impl Lab {
    /// Builds the switch, the nodes (with their pod bridges) and the client.
    pub fn new(cfg: LabConfig) -> anyhow::Result<Self> {
        remove_stale();
        let pid = std::process::id();
        let n = NEXT_LAB.fetch_add(1, Ordering::Relaxed);
        let id = format!("{pid}-{n}");
        let dir = std::env::temp_dir().join(format!("st8s-lab-{id}"));
        let _ = fs::remove_dir_all(&dir);
        fs::create_dir_all(&dir).with_context(|| format!("creating {}", dir.display()))?;
        let pin_root = PathBuf::from(format!("/sys/fs/bpf/st8s-lab-{pid}/{n}"));
        let mut lab = Lab {
            sw: format!("s8-{id}-sw"),
            client: format!("s8-{id}-client"),
            nodes: (1..=cfg.nodes).map(|i| format!("s8-{id}-node{i}")).collect(),
            id,
            dir,
            pin_root,
            cfg,
            netns: Vec::new(),
            pods: BTreeMap::new(),
            next_if: 0,
            agents: BTreeMap::new(),
            unready: Vec::new(),
            cgroup_root: None,
            agent_cgroup: BTreeMap::new(),
            agent_args: Vec::new(),
            terminating: Vec::new(),
            vlan_uplinks: BTreeMap::new(),
        };
        lab.build().context("building the lab network")?;
        Ok(lab)
    }

    fn add_ns(&mut self, name: &str) -> anyhow::Result<()> {
        ip(&["netns", "add", name])?;
        self.netns.push(name.to_owned());
        ip(&["-n", name, "link", "set", "lo", "up"])
    }

    fn build(&mut self) -> anyhow::Result<()> {
        fs::create_dir_all(&self.pin_root)
            .with_context(|| format!("creating {} (is bpffs mounted?)", self.pin_root.display()))?;
        if let Some(cg2) = st8s::dataplane::net::cgroup2_mount()? {
            let root = cg2.join(lab_cgroup_name(&self.id));
            for node in 1..=self.cfg.nodes {
                let dir = root.join(node_name(node));
                fs::create_dir_all(&dir).with_context(|| format!("creating the cgroup {}", dir.display()))?;
            }
            self.cgroup_root = Some(root);
        }
        let sw = self.sw.clone();
        self.add_ns(&sw)?;
        ip(&["-n", &sw, "link", "add", "br0", "type", "bridge"])?;
        ip(&["-n", &sw, "link", "set", "br0", "up"])?;
        // A switch forwards frames and nothing else: where br_netfilter is loaded (Kubernetes
        // nodes load it), bridged frames would otherwise go through this machine's iptables on
        // every pass through the switch, work a hardware switch never does, paid twice by a
        // forwarded flow (issue 18). The sysctls are per network namespace (Linux 5.3+); only
        // the nodes' own bridges keep them on, as on a real node.
        sh(
            "ip",
            &[
                "netns",
                "exec",
                &sw,
                "sh",
                "-c",
                "for f in /proc/sys/net/bridge/bridge-nf-call-*; do [ -e \"$f\" ] && echo 0 > \"$f\"; done; true",
            ],
        )?;
        // The switch's own address: where a test's API-server double listens.
        ip(&["-n", &sw, "addr", "add", &format!("{API_ADDR}/24"), "dev", "br0"])?;
        if self.cfg.dual_stack {
            // An unmanaged switch floods multicast (neighbour solicitations among it); the
            // Linux bridge would otherwise learn groups from MLD, which no querier here asks.
            ip(&[
                "-n",
                &sw,
                "link",
                "set",
                "br0",
                "type",
                "bridge",
                "mcast_snooping",
                "0",
            ])?;
        }
        for (i, ns) in self.nodes.clone().iter().enumerate() {
            let node = i + 1;
            let port = format!("n{node}");
            self.add_ns(ns)?;
            ip(&[
                "link", "add", "eth0", "netns", ns, "type", "veth", "peer", "name", &port, "netns", &sw,
            ])?;
            ip(&["-n", &sw, "link", "set", &port, "master", "br0", "up"])?;
            ip(&[
                "-n",
                ns,
                "addr",
                "add",
                &format!("{}/24", node_addr(node)),
                "dev",
                "eth0",
            ])?;
            ip(&["-n", ns, "link", "set", "eth0", "up"])?;
            if self.cfg.dual_stack {
                add6(ns, &format!("{}/64", node_addr6(node)), "eth0")?;
                sh(
                    "ip",
                    &[
                        "netns",
                        "exec",
                        ns,
                        "sysctl",
                        "-qw",
                        "net.ipv6.conf.all.forwarding=1",
                    ],
                )?;
            }
            // Real NICs put full checksums on the wire; so does every uplink here (see the
            // client's below).
            sh("ip", &["netns", "exec", ns, "ethtool", "-K", "eth0", "tx", "off"])?;
            host_port(ns, "eth0")?;
            queue(&sw, &port)?;
            if self.cfg.routed_cni {
                // Proxy ARP answers only for an address the node has a route to (through
                // another device): a Calico node has its default route; this one gets one for
                // the pods' gateway address alone.
                ip(&["-n", ns, "route", "add", "169.254.1.1/32", "dev", "eth0"])?;
            } else {
                ip(&["-n", ns, "link", "add", "cni0", "type", "bridge"])?;
                ip(&[
                    "-n",
                    ns,
                    "addr",
                    "add",
                    &format!("10.244.{node}.1/24"),
                    "dev",
                    "cni0",
                ])?;
                ip(&["-n", ns, "link", "set", "cni0", "up"])?;
                if self.cfg.dual_stack {
                    add6(ns, &format!("{}1/64", pod_prefix6(node)), "cni0")?;
                }
            }
            sh(
                "ip",
                &["netns", "exec", ns, "sysctl", "-qw", "net.ipv4.ip_forward=1"],
            )?;
            self.route_other_pods(node, ns)?;
            self.attach_stub(&port)?;
        }
        let client = self.client.clone();
        self.add_ns(&client)?;
        ip(&[
            "link", "add", "eth0", "netns", &client, "type", "veth", "peer", "name", "c", "netns", &sw,
        ])?;
        ip(&["-n", &sw, "link", "set", "c", "master", "br0", "up"])?;
        ip(&[
            "-n",
            &client,
            "addr",
            "add",
            &format!("{CLIENT_ADDR}/24"),
            "dev",
            "eth0",
        ])?;
        ip(&["-n", &client, "link", "set", "eth0", "up"])?;
        if self.cfg.dual_stack {
            add6(&client, &format!("{CLIENT_ADDR6}/64"), "eth0")?;
        }
        // A LAN client's packets arrive with complete checksums, as they would off a wire. veth
        // would otherwise hand on CHECKSUM_PARTIAL packets whose checksum field is only the
        // pseudo-header sum; a frame that goes through XDP_TX loses that mark and the backend's
        // stack would then drop it as corrupt.
        sh(
            "ip",
            &["netns", "exec", &client, "ethtool", "-K", "eth0", "tx", "off"],
        )?;
        host_port(&client, "eth0")?;
        // The switch receives the client's frames in NAPI too (the stub), without merging them:
        // a switch forwards frames as they come.
        self.attach_stub("c")?;
        queue(&sw, "c")?;
        if self.cfg.dual_stack {
            self.wait_lan6()?;
        }
        Ok(())
    }

    /// Waits until every node and the client answer each other over IPv6 (bounded: 10 tries of
    /// 1 s per node), so that a test starts on a LAN whose neighbour discovery works, as a
    /// home LAN's hosts have long resolved each other. Without it, a full-suite run on a fresh
    /// clone had node3's entry for the client still INCOMPLETE 2 s after the first forwarded
    /// request (the pod had answered and st8s had translated it: `replied` 2, the SYN-ACK waiting
    /// on neighbour discovery), and the request timed out; why the solicitations went unanswered
    /// that long right after the lab came up is not known yet.
    fn wait_lan6(&self) -> anyhow::Result<()> {
        let target = CLIENT_ADDR6.to_string();
        for ns in &self.nodes {
            let answered = (0..10).any(|_| {
                Command::new("ip")
                    .args(["netns", "exec", ns, "ping", "-6", "-c", "1", "-W", "1", &target])
                    .output()
                    .is_ok_and(|o| o.status.success())
            });
            if !answered {
                bail!("{ns} cannot reach the client {target} over IPv6 on the lab's LAN");
            }
        }
        Ok(())
    }

    /// The `XDP_PASS` stub on the switch side of a node's uplink, pinned as a link so that it
    /// stays while the lab is up (also after `cargo xtask lab --keep` exits).
    fn attach_stub(&self, port: &str) -> anyhow::Result<()> {
        let pin = self.pin_root.join(format!("stub-{port}"));
        let out = Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.sw))
            .arg("--")
            .arg(&self.cfg.xtask_bin)
            .args(["lab-stub", "--iface", port, "--pin"])
            .arg(&pin)
            .output()
            .context("running xtask lab-stub")?;
        if !out.status.success() {
            bail!(
                "attaching the XDP stub to {port}: {}",
                String::from_utf8_lossy(&out.stderr).trim()
            );
        }
        Ok(())
    }

    pub fn node_ns(&self, node: usize) -> &str {
        &self.nodes[node - 1]
    }

    pub fn client_ns(&self) -> &str {
        &self.client
    }

    /// A node's cgroup, if the lab has cgroups.
    pub fn node_cgroup(&self, node: usize) -> Option<PathBuf> {
        Some(self.cgroup_root.as_ref()?.join(node_name(node)))
    }

    /// A command that runs the program given as its next arguments inside `node`'s cgroup, as a
    /// process of that node would (the shell moves itself in, then execs it).
    fn in_node_cgroup(&self, node: usize) -> Command {
        let mut cmd = Command::new("sh");
        match self.node_cgroup(node) {
            Some(cg) => cmd.args([
                "-c",
                r#"echo $$ > "$0/cgroup.procs" && exec "$@""#,
                &cg.to_string_lossy(),
            ]),
            None => cmd.args(["-c", r#"exec "$@""#, "sh"]),
        };
        cmd
    }

    /// Runs `argv` as a process of `node` itself: its network namespace and its cgroup.
    pub fn run_on_node(&self, node: usize, argv: &[&str]) -> anyhow::Result<Output> {
        self.run_in(node, self.node_ns(node), argv)
            .with_context(|| format!("running {argv:?} on node {node}"))
    }

    /// Runs `argv` inside a running pod: its network namespace, its node's cgroup.
    pub fn run_in_pod(&self, pod: &str, argv: &[&str]) -> anyhow::Result<Output> {
        let p = self.pods.get(pod).with_context(|| format!("no pod {pod}"))?;
        self.run_in(p.spec.node, &p.ns, argv)
            .with_context(|| format!("running {argv:?} in pod {pod}"))
    }

    /// Runs `argv` in network namespace `ns`, as a process of `node`'s cgroup.
    fn run_in(&self, node: usize, ns: &str, argv: &[&str]) -> std::io::Result<Output> {
        let mut cmd = self.in_node_cgroup(node);
        cmd.arg("nsenter")
            .arg(format!("--net=/run/netns/{ns}"))
            .arg("--")
            .args(argv);
        cmd.output()
    }

    pub fn switch_ns(&self) -> &str {
        &self.sw
    }

    pub fn cluster_file(&self) -> PathBuf {
        self.dir.join("cluster.yaml")
    }

    pub fn agent_pin_dir(&self, node: usize) -> PathBuf {
        self.pin_root.join(node_name(node))
    }

    /// Starts a pod: its own netns on the node's cni0, running the lab backend server.
    pub fn add_pod(&mut self, spec: PodSpec) -> anyhow::Result<()> {
        if self.pods.contains_key(&spec.name) {
            bail!("pod {} exists", spec.name);
        }
        let node_ns = self.node_ns(spec.node).to_owned();
        self.next_if += 1;
        let ns = format!("s8-{}-p{}", self.id, self.next_if);
        let node_if = format!("v{}", self.next_if);
        let pod_ip = Ipv4Addr::new(10, 244, spec.node as u8, 10 + self.next_if as u8);
        let pod_ip6 = self.cfg.dual_stack.then(|| {
            let p = pod_prefix6(spec.node).segments();
            Ipv6Addr::new(p[0], p[1], p[2], 0, 0, 0, 0, 0x10 + self.next_if as u16)
        });
        self.add_ns(&ns)?;
        ip(&[
            "link", "add", "eth0", "netns", &ns, "type", "veth", "peer", "name", &node_if, "netns", &node_ns,
        ])?;
        if self.cfg.routed_cni {
            // As Calico does: a /32 per pod on the node, the pod's gateway a link-local address
            // that the node's side of the veth answers by proxy ARP.
            ip(&["-n", &node_ns, "link", "set", &node_if, "up"])?;
            sh(
                "ip",
                &[
                    "netns",
                    "exec",
                    &node_ns,
                    "sysctl",
                    "-qw",
                    &format!("net.ipv4.conf.{node_if}.proxy_arp=1"),
                ],
            )?;
            ip(&[
                "-n",
                &node_ns,
                "route",
                "add",
                &format!("{pod_ip}/32"),
                "dev",
                &node_if,
            ])?;
            ip(&["-n", &ns, "addr", "add", &format!("{pod_ip}/32"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "169.254.1.1",
                "dev",
                "eth0",
                "scope",
                "link",
            ])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                "169.254.1.1",
                "dev",
                "eth0",
            ])?;
        } else {
            ip(&["-n", &node_ns, "link", "set", &node_if, "master", "cni0", "up"])?;
            ip(&["-n", &ns, "addr", "add", &format!("{pod_ip}/24"), "dev", "eth0"])?;
            ip(&["-n", &ns, "link", "set", "eth0", "up"])?;
            ip(&[
                "-n",
                &ns,
                "route",
                "add",
                "default",
                "via",
                &format!("10.244.{}.1", spec.node),
            ])?;
            if let Some(a6) = pod_ip6 {
                add6(&ns, &format!("{a6}/64"), "eth0")?;
                let gw = format!("{}1", pod_prefix6(spec.node));
                ip(&["-n", &ns, "-6", "route", "add", "default", "via", &gw])?;
            }
        }
        let mut cmd = self.in_node_cgroup(spec.node);
        cmd.arg("nsenter").arg(format!("--net=/run/netns/{ns}")).arg("--");
        match &spec.command {
            Some(argv) => {
                cmd.args(argv);
            }
            None => {
                cmd.arg(&self.cfg.xtask_bin).args([
                    "lab-backend",
                    "--name",
                    &format!("{NAMESPACE}/{}", spec.name),
                ]);
                if let Some(p) = spec.http {
                    cmd.args(["--http", &p.to_string()]);
                }
                if let Some(p) = spec.dns {
                    cmd.args(["--dns", &p.to_string()]);
                }
                for p in &spec.discovery {
                    cmd.args(["--discovery", &p.to_string()]);
                }
                let prefix = if self.cfg.routed_cni { 32 } else { 24 };
                cmd.args(["--addr", &format!("{pod_ip}/{prefix}")]);
            }
        }
        let log = fs::File::create(self.dir.join(format!("pod-{}.log", spec.name)))?;
        let server = cmd
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting a lab backend")?;
        self.pods.insert(
            spec.name.clone(),
            Pod {
                spec,
                ns,
                ip: pod_ip,
                ip6: pod_ip6,
                node_if,
                server,
            },
        );
        Ok(())
    }

    /// The ifindex, in its node, of the host side of a pod's veth (its own link).
    pub fn pod_link(&self, name: &str) -> anyhow::Result<u32> {
        let pod = self.pods.get(name).with_context(|| format!("no pod {name}"))?;
        let ifname = std::ffi::CString::new(pod.node_if.clone())?;
        // SAFETY: a valid C string; the call only reads it.
        let index = in_netns(self.node_ns(pod.spec.node), move || unsafe {
            libc::if_nametoindex(ifname.as_ptr())
        })?;
        anyhow::ensure!(index != 0, "{} has no link {}", name, pod.node_if);
        Ok(index)
    }

    /// Stops a pod and removes its network.
    pub fn remove_pod(&mut self, name: &str) -> anyhow::Result<()> {
        let Some(mut pod) = self.pods.remove(name) else {
            bail!("no pod {name}");
        };
        let _ = pod.server.kill();
        let _ = pod.server.wait();
        let _ = ip(&["-n", self.node_ns(pod.spec.node), "link", "del", &pod.node_if]);
        self.netns.retain(|n| *n != pod.ns);
        self.terminating.retain(|n| n != name);
        kill_netns_processes(&pod.ns);
        ip(&["netns", "del", &pod.ns])
    }

    /// Marks a running pod as not Ready in the cluster file (or Ready again).
    pub fn set_ready(&mut self, name: &str, ready: bool) {
        self.unready.retain(|n| n != name);
        if !ready {
            self.unready.push(name.to_owned());
        }
    }

    /// Marks a running pod as deleted (a `deletionTimestamp`, as a rolling update's delete sets
    /// it) while it stays Ready, in its grace period.
    pub fn set_terminating(&mut self, name: &str) {
        self.terminating.push(name.to_owned());
    }

    pub fn pod_ip(&self, name: &str) -> Option<Ipv4Addr> {
        self.pods.get(name).map(|p| p.ip)
    }

    /// A pod's IPv6 address on a dual-stack lab.
    pub fn pod_ip6(&self, name: &str) -> Option<Ipv6Addr> {
        self.pods.get(name).and_then(|p| p.ip6)
    }

    /// The cluster as `kubectl get nodes,pods -A -o yaml` would print it (the fields st8s reads).
    pub fn cluster_yaml(&self) -> String {
        let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
        for node in 1..=self.cfg.nodes {
            let _ = write!(
                y,
                "- apiVersion: v1\n  kind: Node\n  metadata:\n    name: {}\n    labels:\n      st8s.io/zone: lab\n  status:\n    addresses:\n    - type: InternalIP\n      address: {}\n{}    conditions:\n    - type: Ready\n      status: \"True\"\n",
                node_name(node),
                node_addr(node),
                if self.cfg.dual_stack {
                    format!("    - type: InternalIP\n      address: {}\n", node_addr6(node))
                } else {
                    String::new()
                }
            );
        }
        for pod in self.pods.values() {
            let ready = if self.unready.contains(&pod.spec.name) {
                "False"
            } else {
                "True"
            };
            let annotations = if pod.spec.discovery.is_empty() {
                String::new()
            } else {
                let ports: Vec<String> = pod.spec.discovery.iter().map(|p| format!("{p}/udp")).collect();
                format!(
                    "    annotations:\n      st8s.io/discovery: \"{}\"\n",
                    ports.join(",")
                )
            };
            let deleted = if self.terminating.contains(&pod.spec.name) {
                "    deletionTimestamp: \"2026-01-01T00:00:00Z\"\n"
            } else {
                ""
            };
            let _ = write!(
                y,
                "- apiVersion: v1\n  kind: Pod\n  metadata:\n    name: {}\n    namespace: {NAMESPACE}\n{deleted}{annotations}  spec:\n    nodeName: {}\n    containers:\n    - name: server\n      ports:\n",
                pod.spec.name,
                node_name(pod.spec.node)
            );
            for p in &pod.spec.ports {
                let _ = write!(
                    y,
                    "      - containerPort: {}\n        hostPort: {}\n        protocol: {}\n",
                    p.container, p.host, p.proto
                );
            }
            // A dual-stack pod lists both families in podIPs, IPv4 first, as the kubelet
            // does on an IPv4-primary cluster.
            let pod_ips = match pod.ip6 {
                Some(a6) => format!("    podIPs:\n    - ip: {}\n    - ip: {a6}\n", pod.ip),
                None => String::new(),
            };
            let _ = write!(
                y,
                "  status:\n    podIP: {}\n{pod_ips}    conditions:\n    - type: Ready\n      status: \"{ready}\"\n",
                pod.ip
            );
        }
        y
    }

    /// Writes the cluster file atomically (the agents poll it).
    pub fn write_cluster(&self) -> anyhow::Result<()> {
        self.write_raw(&self.cluster_yaml())
    }

    pub fn write_raw(&self, text: &str) -> anyhow::Result<()> {
        let tmp = self.dir.join("cluster.yaml.tmp");
        fs::write(&tmp, text)?;
        fs::rename(&tmp, self.cluster_file())?;
        Ok(())
    }

    pub fn start_agents(&mut self) -> anyhow::Result<()> {
        for node in 1..=self.cfg.nodes {
            self.start_agent(node)?;
        }
        Ok(())
    }

    pub fn start_agent(&mut self, node: usize) -> anyhow::Result<()> {
        let log = fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(self.agent_log(node))?;
        let mut cmd = Command::new("nsenter");
        cmd.arg(format!("--net=/run/netns/{}", self.node_ns(node)))
            .arg("--");
        if let Some(caps) = &self.cfg.agent_caps {
            // setpriv after nsenter (which needs CAP_SYS_ADMIN): root, with a bounding set of
            // exactly these, so the agent's permitted and effective sets are exactly these.
            let set: Vec<String> = caps.iter().map(|c| format!("+{}", c.to_lowercase())).collect();
            cmd.arg("setpriv")
                .arg(format!("--bounding-set=-all,{}", set.join(",")))
                .arg("--inh-caps=-all")
                .arg("--");
        }
        cmd.arg(&self.cfg.st8s_bin)
            .args(["agent", "--node", &node_name(node)]);
        match &self.cfg.kubeconfig {
            Some(k) => cmd.env("KUBECONFIG", k),
            None => cmd.arg("--from-file").arg(self.cluster_file()),
        };
        let child = cmd
            .arg("--pin-dir")
            .arg(self.agent_pin_dir(node))
            .arg("--iface")
            .arg(self.uplink(node))
            .args(["--poll-ms", "100", "--xdp", &self.cfg.xdp])
            .args([
                "--prefer-local",
                if self.cfg.prefer_local { "true" } else { "false" },
            ])
            // The node's own cgroup, never the machine's: the hooks must see this node's
            // processes and pods only.
            .arg("--cgroup")
            .arg(match self.agent_cgroup.get(&node) {
                Some(c) => c.into(),
                None => self.node_cgroup(node).unwrap_or_else(|| "off".into()),
            })
            .args(&self.agent_args)
            .env("RUST_LOG", "info")
            .stdout(Stdio::null())
            .stderr(log)
            .spawn()
            .context("starting st8s agent")?;
        self.agents.insert(node, child);
        Ok(())
    }

    /// Stops an agent with SIGTERM and waits for it.
    pub fn stop_agent(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(mut child) = self.agents.remove(&node) {
            terminate(&mut child);
        }
        Ok(())
    }

    /// Kills an agent with SIGKILL (a crash): nothing of its own cleanup runs.
    /// Gives the agents of `node` started from now on this `--cgroup` (a host without cgroup v2
    /// looks like a directory that is none).
    pub fn set_agent_cgroup(&mut self, node: usize, cgroup: &str) {
        self.agent_cgroup.insert(node, cgroup.to_owned());
    }

    /// A node's routes to the other nodes' pod subnets, through those nodes (as flannel's
    /// host-gw backend installs them).
    fn route_other_pods(&self, node: usize, ns: &str) -> anyhow::Result<()> {
        for other in (1..=self.cfg.nodes).filter(|o| *o != node) {
            ip(&[
                "-n",
                ns,
                "route",
                "add",
                &format!("10.244.{other}.0/24"),
                "via",
                &node_addr(other).to_string(),
            ])?;
            if self.cfg.dual_stack {
                let prefix = format!("{}/64", pod_prefix6(other));
                ip(&[
                    "-n",
                    ns,
                    "-6",
                    "route",
                    "add",
                    &prefix,
                    "via",
                    &node_addr6(other).to_string(),
                ])?;
            }
        }
        Ok(())
    }

    /// The interface that holds a node's LAN address: eth0, or its VLAN subinterface.
    pub fn uplink(&self, node: usize) -> String {
        self.vlan_uplinks
            .get(&node)
            .cloned()
            .unwrap_or_else(|| "eth0".to_owned())
    }

    /// Puts a node's address on a VLAN subinterface (`eth0.<vid>`), as on a home network whose
    /// servers sit on a tagged VLAN: the node's switch port becomes a trunk that carries the
    /// LAN as VLAN `vid`, tagged (the switch bridges the port's own `.<vid>` subinterface, which
    /// needs no VLAN-aware bridge); every other port stays an access port (untagged). Needs
    /// the kernel's 802.1Q support (8021q). Call before starting the agents.
    pub fn uplink_on_vlan(&mut self, node: usize, vid: u16) -> anyhow::Result<()> {
        let sw = self.sw.clone();
        let ns = self.nodes[node - 1].clone();
        let vid_s = vid.to_string();
        let vlan_if = format!("eth0.{vid}");
        let port = format!("n{node}");
        let trunk = format!("n{node}.{vid}");
        ip(&["-n", &sw, "link", "set", &port, "nomaster"])?;
        ip(&[
            "-n", &sw, "link", "add", "link", &port, "name", &trunk, "type", "vlan", "id", &vid_s,
        ])
        .context("a VLAN device (the kernel's 8021q)")?;
        ip(&["-n", &sw, "link", "set", &trunk, "master", "br0", "up"])?;
        // The node: its address moves from eth0 to eth0.<vid>, and the routes to the other
        // nodes' pods with it.
        let addr = format!("{}/24", node_addr(node));
        ip(&["-n", &ns, "addr", "del", &addr, "dev", "eth0"])?;
        ip(&[
            "-n", &ns, "link", "add", "link", "eth0", "name", &vlan_if, "type", "vlan", "id", &vid_s,
        ])?;
        ip(&["-n", &ns, "addr", "add", &addr, "dev", &vlan_if])?;
        ip(&["-n", &ns, "link", "set", &vlan_if, "up"])?;
        self.route_other_pods(node, &ns)?;
        self.vlan_uplinks.insert(node, vlan_if);
        Ok(())
    }

    /// Gives every agent started from now on these extra arguments (`--mdns`).
    pub fn set_agent_args(&mut self, args: &[&str]) {
        self.agent_args = args.iter().map(|a| (*a).to_owned()).collect();
    }

    /// Runs the agents started from now on with only these capabilities (`None`: all).
    pub fn set_agent_caps(&mut self, caps: Option<Vec<String>>) {
        self.cfg.agent_caps = caps;
    }

    /// Waits (bounded) for a node's agent to exit; its status, or None if it still runs.
    pub fn wait_agent_exit(&mut self, node: usize, timeout: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + timeout;
        loop {
            let status = self.agents.get_mut(&node)?.try_wait().ok().flatten();
            if let Some(s) = status {
                self.agents.remove(&node);
                return Some(s);
            }
            if Instant::now() >= deadline {
                return None;
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    pub fn kill_agent(&mut self, node: usize) {
        if let Some(mut child) = self.agents.remove(&node) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// `st8s uninstall` for one node's pin directory.
    pub fn uninstall(&self, node: usize) -> anyhow::Result<Output> {
        // In the node's network namespace, as the DaemonSet's hostNetwork pod runs it: netlink
        // TC filters live on the node's interfaces.
        Command::new("nsenter")
            .arg(format!("--net=/run/netns/{}", self.node_ns(node)))
            .arg("--")
            .arg(&self.cfg.st8s_bin)
            .arg("uninstall")
            .arg("--pin-dir")
            .arg(self.agent_pin_dir(node))
            .output()
            .context("running st8s uninstall")
    }

    /// The pid of a node's agent (nsenter execs it in place).
    pub fn agent_pid(&self, node: usize) -> Option<u32> {
        self.agents.get(&node).map(Child::id)
    }

    /// The lab's private directory (cluster file, logs, server configs).
    pub fn dir(&self) -> &Path {
        &self.dir
    }

    pub fn agent_log(&self, node: usize) -> PathBuf {
        self.dir.join(format!("agent-{}.log", node_name(node)))
    }

    pub fn agent_logs(&self) -> String {
        let mut s = String::new();
        for node in 1..=self.cfg.nodes {
            let text = fs::read_to_string(self.agent_log(node)).unwrap_or_default();
            let tail: Vec<&str> = text.lines().rev().take(15).collect();
            let _ = writeln!(s, "--- {} agent log (last lines) ---", node_name(node));
            for l in tail.into_iter().rev() {
                let _ = writeln!(s, "{l}");
            }
        }
        s
    }

    /// The live table of one node, read from its pinned maps.
    pub fn snapshot(&self, node: usize) -> anyhow::Result<st8s::dataplane::inspect::Snapshot> {
        st8s::dataplane::inspect::snapshot(&self.agent_pin_dir(node))
    }

    /// Waits until every agent's maps hold what the cluster file says: each port with all its
    /// backends (peer MACs resolved) and the right local pod.
    pub fn wait_synced(&mut self, timeout: Duration) -> anyhow::Result<()> {
        let cluster = st8s::sources::file::read_cluster(&fs::read_to_string(self.cluster_file())?)?;
        let start = Instant::now();
        for node in 1..=self.cfg.nodes {
            if self.agents.contains_key(&node) {
                self.wait_ready(node, timeout.saturating_sub(start.elapsed()))?;
            }
            let want = st8s::core::plan(&cluster, &node_name(node))?.desired;
            loop {
                self.ensure_agent_running(node)?;
                // The table, and every peer's MAC: until a node has learned a peer's MAC (a
                // neighbour solicitation, then the agent's next tick) it passes that peer's
                // forwards to its kernel (`untrusted_peer`). A node whose ports are all local
                // needs no peer for its table, so the table alone could match inside that
                // window.
                let matches = self.snapshot(node).is_ok_and(|s| table_matches(&s, &want))
                    && self.peer_macs(node) >= want.peers().count();
                if matches {
                    break;
                }
                if start.elapsed() > timeout {
                    bail!(
                        "the agent of {} did not program the expected table within {timeout:?}\n{}",
                        node_name(node),
                        self.agent_logs()
                    );
                }
                thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    /// How many peer MACs a node's agent has programmed (`ST8S_PEER_MACS`).
    fn peer_macs(&self, node: usize) -> usize {
        let path = self.agent_pin_dir(node).join(st8s_common::map_names::PEER_MACS);
        let Ok(data) = aya::maps::MapData::from_pin(&path) else {
            return 0;
        };
        let Ok(map) = aya::maps::Map::from_map_data(data) else {
            return 0;
        };
        aya::maps::HashMap::<_, st8s_common::MacKey, u32>::try_from(map)
            .map_or(0, |m| m.keys().filter(Result::is_ok).count())
    }

    /// An error with the agents' logs if the node's agent has exited.
    fn ensure_agent_running(&mut self, node: usize) -> anyhow::Result<()> {
        if let Some(child) = self.agents.get_mut(&node)
            && let Ok(Some(status)) = child.try_wait()
        {
            bail!(
                "the agent of {} exited ({status})\n{}",
                node_name(node),
                self.agent_logs()
            );
        }
        Ok(())
    }

    /// Waits until the node's agent answers `/readyz` with 200.
    pub fn wait_ready(&mut self, node: usize, timeout: Duration) -> anyhow::Result<()> {
        let start = Instant::now();
        loop {
            self.ensure_agent_running(node)?;
            let out = self.exec(
                self.node_ns(node),
                "curl",
                &["-sf", "--max-time", "1", "http://127.0.0.1:9470/readyz"],
            )?;
            if out.status.success() {
                return Ok(());
            }
            if start.elapsed() > timeout {
                bail!(
                    "the agent of {} was not ready within {timeout:?}\n{}",
                    node_name(node),
                    self.agent_logs()
                );
            }
            thread::sleep(Duration::from_millis(50));
        }
    }

    /// `GET http://127.0.0.1:9470<path>` inside a node: (HTTP status, body).
    pub fn agent_http(&self, node: usize, path: &str) -> anyhow::Result<(u16, String)> {
        let url = format!("http://127.0.0.1:9470{path}");
        let out = self.exec(
            self.node_ns(node),
            "curl",
            &["-s", "--max-time", "2", "-w", "\n%{http_code}", &url],
        )?;
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
        Ok((code.trim().parse().unwrap_or(0), body.to_owned()))
    }

    /// Waits until `pred` holds for a node's live table; returns how long that took.
    pub fn wait_table(
        &self,
        node: usize,
        timeout: Duration,
        pred: impl Fn(&st8s::dataplane::inspect::Snapshot) -> bool,
    ) -> anyhow::Result<Duration> {
        let start = Instant::now();
        loop {
            if self.snapshot(node).is_ok_and(|s| pred(&s)) {
                return Ok(start.elapsed());
            }
            if start.elapsed() > timeout {
                bail!(
                    "{}'s table did not reach the expected state within {timeout:?}\n{}",
                    node_name(node),
                    self.agent_logs()
                );
            }
            thread::sleep(Duration::from_millis(10));
        }
    }

    /// Runs a command in a namespace of the lab.
    pub fn exec(&self, ns: &str, cmd: &str, args: &[&str]) -> anyhow::Result<Output> {
        Command::new("ip")
            .args(["netns", "exec", ns, cmd])
            .args(args)
            .output()
            .with_context(|| format!("running {cmd} in {ns}"))
    }

    /// `curl http://<node>:<port>/` from the client.
    /// Cuts a node's link to the LAN (its switch port goes down), or restores it.
    pub fn set_link(&self, node: usize, up: bool) -> anyhow::Result<()> {
        ip(&[
            "-n",
            &self.sw,
            "link",
            "set",
            &format!("n{node}"),
            if up { "up" } else { "down" },
        ])
    }

    /// One quick HTTP GET from the client on a new connection (short timeouts, for loops that
    /// measure outages): the pod that answered, or None.
    pub fn quick_get(&self, addr: Ipv4Addr, port: u16, timeout: Duration) -> Option<String> {
        quick_get_in(&self.client, addr, port, timeout)
    }

    /// Sends one UDP datagram from the client (from `from_port`, or any port) to `dst:port`,
    /// broadcast and multicast allowed, and collects every answer for `wait` (joined to `group`
    /// when given). Answers from the client's own address (multicast loopback) are left out.
    pub fn udp_ask(
        &self,
        dst: Ipv4Addr,
        port: u16,
        payload: impl AsRef<[u8]>,
        from_port: u16,
        group: Option<Ipv4Addr>,
        wait: Duration,
    ) -> anyhow::Result<Vec<(std::net::SocketAddrV4, String)>> {
        let payload = payload.as_ref().to_vec();
        let answers = in_netns(&self.client, move || -> anyhow::Result<_> {
            let s = std::net::UdpSocket::bind((Ipv4Addr::UNSPECIFIED, from_port))?;
            bind_to_lan_port(&s)?;
            s.set_broadcast(true)?;
            s.set_multicast_loop_v4(false)?;
            // As mDNS queriers send (RFC 6762 section 11); one LAN, so harmless for SSDP.
            s.set_multicast_ttl_v4(255)?;
            if let Some(g) = group {
                s.join_multicast_v4(&g, &CLIENT_ADDR)?;
            }
            s.send_to(&payload, (dst, port))?;
            collect_answers(&s, wait)
        })??;
        Ok(answers
            .into_iter()
            .filter_map(|(from, text)| match from {
                SocketAddr::V4(f) if *f.ip() != CLIENT_ADDR => Some((f, text)),
                _ => None,
            })
            .collect())
    }

    /// [`udp_ask`](Self::udp_ask) over IPv6: from `from` (the unspecified address lets the
    /// kernel choose, which for a link-scope group is the client's link-local address, RFC 6724
    /// rule 2), joined to `group` on the LAN port if given, with hop limit 255 and without
    /// its own multicast looped back.
    pub fn udp_ask6(
        &self,
        dst: Ipv6Addr,
        port: u16,
        payload: impl AsRef<[u8]>,
        from: (Ipv6Addr, u16),
        group: Option<Ipv6Addr>,
        wait: Duration,
    ) -> anyhow::Result<Vec<(std::net::SocketAddrV6, String)>> {
        let payload = payload.as_ref().to_vec();
        let answers = in_netns(&self.client, move || -> anyhow::Result<_> {
            let lan = st8s::dataplane::net::ifindex("eth0")?;
            let s = std::net::UdpSocket::bind(std::net::SocketAddrV6::new(from.0, from.1, 0, 0))?;
            bind_to_lan_port(&s)?;
            s.set_multicast_loop_v6(false)?;
            crate::set_int_option(&s, libc::IPPROTO_IPV6, libc::IPV6_MULTICAST_HOPS, 255)?;
            if let Some(g) = group {
                s.join_multicast_v6(&g, lan)?;
            }
            s.send_to(&payload, std::net::SocketAddrV6::new(dst, port, 0, lan))?;
            collect_answers(&s, wait)
        })??;
        Ok(answers
            .into_iter()
            .filter_map(|(from, text)| match from {
                SocketAddr::V6(f) if *f.ip() != CLIENT_ADDR6 => Some((f, text)),
                _ => None,
            })
            .collect())
    }

    pub fn http(&self, node: usize, port: u16) -> Answer {
        self.http_to(node_addr(node), port)
    }

    /// What the client gets from running `tool` (curl, dig) against a lab server.
    fn ask(&self, tool: &str, args: &[&str]) -> Answer {
        match self.exec(&self.client, tool, args) {
            Ok(out) => Answer::parse(&out),
            Err(e) => Answer::failed(e.to_string()),
        }
    }

    /// An HTTP POST of `bytes` bytes from the client to `addr`: a bulk transfer towards the pod,
    /// whose answer says how much arrived (`Answer::received`).
    pub fn upload_to(&self, addr: impl Into<IpAddr>, port: u16, bytes: usize) -> Answer {
        let url = format!("http://{}/", SocketAddr::new(addr.into(), port));
        let file = self.dir.join(format!("upload-{bytes}"));
        if !file.exists() {
            // Not all zeros: nothing on the way may shrink it.
            let data: Vec<u8> = (0..bytes).map(|i| (i.wrapping_mul(31) >> 3) as u8).collect();
            if let Err(e) = fs::write(&file, data) {
                return Answer::failed(format!("writing {}: {e}", file.display()));
            }
        }
        let data = format!("@{}", file.display());
        self.ask(
            "curl",
            &[
                "-sS",
                "--max-time",
                "10",
                "--connect-timeout",
                "2",
                "-H",
                "Content-Type: application/octet-stream",
                // No `Expect: 100-continue` pause: the lab's server answers once the body is in.
                "-H",
                "Expect:",
                "--data-binary",
                &data,
                &url,
            ],
        )
    }

    pub fn http_to(&self, addr: impl Into<IpAddr>, port: u16) -> Answer {
        let url = format!("http://{}/", SocketAddr::new(addr.into(), port));
        self.ask(
            "curl",
            &["-sS", "--max-time", "3", "--connect-timeout", "2", &url],
        )
    }

    /// `dig TXT whoami.lab @<node>` from the client, over UDP or TCP.
    pub fn dns(&self, node: usize, tcp: bool) -> Answer {
        self.dns_to(node_addr(node).into(), tcp)
    }

    /// `dig TXT whoami.lab @<addr>` from the client, over UDP or TCP.
    pub fn dns_to(&self, addr: IpAddr, tcp: bool) -> Answer {
        let server = format!("@{addr}");
        let mut args = vec![
            "+short",
            "+time=2",
            "+tries=1",
            server.as_str(),
            "whoami.lab",
            "TXT",
        ];
        if tcp {
            args.insert(0, "+tcp");
        }
        self.ask("dig", &args)
    }

    pub fn teardown(&mut self) {
        for (_, mut child) in std::mem::take(&mut self.agents) {
            terminate(&mut child);
        }
        for pod in self.pods.values_mut() {
            let _ = pod.server.kill();
            let _ = pod.server.wait();
        }
        self.pods.clear();
        for ns in self.netns.drain(..).rev() {
            kill_netns_processes(&ns);
            let _ = Command::new("ip").args(["netns", "del", &ns]).status();
        }
        if let Some(root) = self.cgroup_root.take() {
            remove_cgroup_tree(&root);
        }
        let _ = fs::remove_dir_all(&self.pin_root);
        if let Some(parent) = self.pin_root.parent() {
            let _ = fs::remove_dir(parent);
        }
        let _ = fs::remove_dir_all(&self.dir);
    }

    /// Leaves everything up (for `cargo xtask lab --keep`): agents and pods keep running.
    pub fn leak(mut self) {
        self.netns.clear();
        self.agents.clear();
        self.pods.clear();
        self.cgroup_root = None;
        std::mem::forget(self);
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.teardown();
    }
}

/// Kills every process inside a namespace (servers that fork workers leave them behind when only
/// the parent is killed).
fn kill_netns_processes(ns: &str) {
    if let Ok(out) = Command::new("ip").args(["netns", "pids", ns]).output() {
        for p in String::from_utf8_lossy(&out.stdout).split_whitespace() {
            if let Ok(pid) = p.parse::<i32>() {
                // SAFETY: kill(2) on a process inside the lab's own namespace.
                unsafe { libc::kill(pid, libc::SIGKILL) };
            }
        }
    }
}

fn terminate(child: &mut Child) {
    // SAFETY: kill(2) on our own child's pid.
    unsafe {
        libc::kill(child.id() as i32, libc::SIGTERM);
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while Instant::now() < deadline {
        if let Ok(Some(_)) = child.try_wait() {
            return;
        }
        thread::sleep(Duration::from_millis(20));
    }
    let _ = child.kill();
    let _ = child.wait();
}

/// Does the live table hold the planned ports, all backends and the right local pod?
pub fn table_matches(s: &st8s::dataplane::inspect::Snapshot, want: &st8s::core::Desired) -> bool {
    if s.ports.len() != want.ports.len() {
        return false;
    }
    for (k, v, backends, _) in &s.ports {
        let Some(proto) = st8s::core::Proto::from_number(k.proto) else {
            return false;
        };
        let id = st8s::core::PortId {
            port: u16::from_be(k.port_be),
            proto,
        };
        let Some(p) = want.ports.get(&id) else {
            return false;
        };
        // As sets: a node keeps its place in the maps' list while it serves the port, so the
        // list's order is its history, not the plan's.
        let have: BTreeSet<(Ipv4Addr, bool)> = backends
            .iter()
            .map(|b| {
                (
                    Ipv4Addr::from(u32::from_be(b.node_addr_be)),
                    b.flags & st8s_common::BACKEND_DRAINING != 0,
                )
            })
            .collect();
        let need: BTreeSet<(Ipv4Addr, bool)> = p.backends.iter().map(|b| (b.node_addr, b.draining)).collect();
        if have.len() != backends.len() || have != need {
            return false;
        }
        let local = (v.has_local != 0).then(|| Ipv4Addr::from(u32::from_be(v.local_addr_be)));
        if local != p.local.as_ref().map(|l| l.addr) {
            return false;
        }
        let draining = v.flags & st8s_common::PORT_LOCAL_DRAINING != 0;
        if draining != p.local.as_ref().is_some_and(|l| l.draining) {
            return false;
        }
    }
    true
}

/// The client has no default route: broadcast and multicast go out of its LAN port.
fn bind_to_lan_port(s: &std::net::UdpSocket) -> anyhow::Result<()> {
    use std::os::fd::AsRawFd as _;
    let dev = b"eth0\0";
    // SAFETY: a valid socket and a NUL-terminated name of the given length.
    let rc = unsafe {
        libc::setsockopt(
            s.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_BINDTODEVICE,
            dev.as_ptr().cast(),
            dev.len() as libc::socklen_t,
        )
    };
    if rc != 0 {
        return Err(std::io::Error::last_os_error().into());
    }
    Ok(())
}

/// Every datagram `s` receives within `wait`, with its sender.
fn collect_answers(s: &std::net::UdpSocket, wait: Duration) -> anyhow::Result<Vec<(SocketAddr, String)>> {
    let deadline = Instant::now() + wait;
    let mut out = Vec::new();
    let mut buf = [0u8; 1500];
    while let Some(left) = deadline.checked_duration_since(Instant::now()) {
        s.set_read_timeout(Some(left.max(Duration::from_millis(1))))?;
        match s.recv_from(&mut buf) {
            Ok((n, from)) => out.push((from, String::from_utf8_lossy(&buf[..n]).into_owned())),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                break;
            }
            Err(e) => return Err(e.into()),
        }
    }
    Ok(out)
}

/// Runs `f` on a thread that has entered the network namespace `ns` (for tests that hold a
/// connection open across a change, which a one-shot curl cannot).
pub fn in_netns<T: Send + 'static>(ns: &str, f: impl FnOnce() -> T + Send + 'static) -> anyhow::Result<T> {
    let path = format!("/run/netns/{ns}");
    let file = fs::File::open(&path).with_context(|| format!("opening {path}"))?;
    let handle = thread::spawn(move || {
        use std::os::fd::AsRawFd as _;
        // SAFETY: setns on this thread only, with an fd we own.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(anyhow::anyhow!("setns: {}", std::io::Error::last_os_error()));
        }
        Ok(f())
    });
    handle
        .join()
        .map_err(|_| anyhow::anyhow!("netns thread panicked"))?
}

/// [`Lab::quick_get`] for threads that do not hold the lab: from the namespace `ns`.
pub fn quick_get_in(ns: &str, addr: Ipv4Addr, port: u16, timeout: Duration) -> Option<String> {
    in_netns(ns, move || -> Option<String> {
        use std::io::{Read as _, Write as _};
        let mut s = std::net::TcpStream::connect_timeout(&(addr, port).into(), timeout).ok()?;
        s.set_read_timeout(Some(timeout)).ok()?;
        s.set_write_timeout(Some(timeout)).ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: lab\r\nConnection: close\r\n\r\n")
            .ok()?;
        let mut body = String::new();
        s.read_to_string(&mut body).ok()?;
        body.split_whitespace()
            .find_map(|w| w.strip_prefix("pod="))
            .map(str::to_owned)
    })
    .ok()
    .flatten()
}
