//! `st8s dns` end to end: zones rendered from cluster YAML, checked by a real zone checker
//! (named-checkzone), served by a real authoritative server (knotd) in a network namespace of the
//! test's own, and queried with dig on that namespace's loopback.

use std::{
    fs,
    path::{Path, PathBuf},
    process::{Child, Command, Stdio},
    time::{Duration, Instant},
};

const DOMAIN: &str = "home.example.org";

fn st8s() -> PathBuf {
    xtask::st8s_debug_bin()
}

fn cluster(node2_ready: bool) -> String {
    let node = |name: &str, ip: &str, ready: bool, zone: &str| {
        format!(
            "- apiVersion: v1\n  kind: Node\n  metadata: {{name: {name}, labels: {{st8s.io/zone: {zone}}}}}\n  status:\n    addresses: [{{type: InternalIP, address: {ip}}}]\n    conditions: [{{type: Ready, status: \"{}\"}}]\n",
            if ready { "True" } else { "False" }
        )
    };
    let mut y = String::from("apiVersion: v1\nkind: List\nitems:\n");
    y += &node("node1", "10.77.0.11", true, "attic");
    y += &node("node2", "10.77.0.12", node2_ready, "attic");
    y += &node("node3", "10.77.0.13", true, "garage");
    y += r#"- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: jellyfin, namespace: media}
  spec: {rules: [{host: jellyfin.home.example.org}]}
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: gotify, namespace: notify, annotations: {st8s.io/exposure: wan}}
  spec: {hostnames: [gotify.home.example.org]}
- apiVersion: traefik.io/v1alpha1
  kind: IngressRoute
  metadata: {name: ha, namespace: home, annotations: {st8s.io/exposure: lan}}
  spec: {routes: [{match: "Host(`ha.home.example.org`)", kind: Rule}]}
"#;
    y
}

struct Dir(PathBuf);
impl Drop for Dir {
    fn drop(&mut self) {
        let _ = fs::remove_dir_all(&self.0);
    }
}

fn tmpdir(tag: &str) -> Dir {
    let d = std::env::temp_dir().join(format!("st8s-dns-{}-{tag}", std::process::id()));
    let _ = fs::remove_dir_all(&d);
    fs::create_dir_all(&d).expect("tmp");
    Dir(d)
}

fn render(dir: &Path, yaml: &str) -> (String, String) {
    fs::write(dir.join("cluster.yaml"), yaml).expect("write");
    let out = Command::new(st8s())
        .args(["dns", "--domain", DOMAIN, "--from-file"])
        .arg(dir.join("cluster.yaml"))
        .arg("--out")
        .arg(dir.join("zone.db"))
        .output()
        .expect("st8s dns");
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (
        fs::read_to_string(dir.join("zone.db")).expect("zone"),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

fn checkzone(zone: &Path) {
    checkzone_as(DOMAIN, zone);
}

fn checkzone_as(origin: &str, zone: &Path) {
    let out = Command::new("named-checkzone")
        .arg(origin)
        .arg(zone)
        .output()
        .expect("named-checkzone (bind9-utils)");
    assert!(
        out.status.success(),
        "named-checkzone rejected the zone:\n{}\n{}",
        String::from_utf8_lossy(&out.stdout),
        fs::read_to_string(zone).unwrap_or_default()
    );
}

#[test]
fn rendered_zones_pass_named_checkzone_and_the_serial_moves_only_on_change() {
    let dir = tmpdir("check");
    let (empty, _) = render(&dir.0, "apiVersion: v1\nkind: List\nitems: []\n");
    checkzone(&dir.0.join("zone.db"));
    assert!(
        empty.contains("IN SOA") && empty.contains("IN NS"),
        "an empty cluster is SOA + NS:\n{empty}"
    );
    let (z1, warnings) = render(&dir.0, &cluster(true));
    checkzone(&dir.0.join("zone.db"));
    assert_eq!(st8s::dns::serial_of(&z1), Some(2), "{z1}");
    let (z2, _) = render(&dir.0, &cluster(true));
    assert_eq!(z1, z2, "same cluster, same zone, same serial");
    let (z3, _) = render(&dir.0, &cluster(false));
    assert_eq!(st8s::dns::serial_of(&z3), Some(3));
    checkzone(&dir.0.join("zone.db"));
    assert!(warnings.is_empty(), "{warnings}");

    // The per-name layout: every zone valid; a name that stops being published loses its file.
    let zones = dir.0.join("zones");
    let per_name = |yaml: &str| -> Vec<String> {
        fs::write(dir.0.join("cluster.yaml"), yaml).expect("write");
        let out = Command::new(st8s())
            .args(["dns", "--domain", DOMAIN, "--from-file"])
            .arg(dir.0.join("cluster.yaml"))
            .arg("--zone-dir")
            .arg(&zones)
            .output()
            .expect("st8s dns");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut names: Vec<String> = fs::read_dir(&zones)
            .expect("zones")
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.to_owned()))
            .collect();
        names.sort();
        names
    };
    let files = per_name(&cluster(true));
    assert!(
        files.contains(&"jellyfin.home.example.org.zone".to_owned()),
        "{files:?}"
    );
    for f in &files {
        checkzone_as(f.trim_end_matches(".zone"), &zones.join(f));
    }
    let without_jellyfin = cluster(true).replace("jellyfin.home.example.org", "other.example.com");
    let files = per_name(&without_jellyfin);
    assert!(
        !files.contains(&"jellyfin.home.example.org.zone".to_owned()),
        "{files:?}"
    );
    assert!(
        files.contains(&"ha.home.example.org.zone".to_owned()),
        "{files:?}"
    );
}

/// A network namespace of the test's own (loopback up), and the servers started in it; both
/// go when it drops.
struct Netns(String, Vec<Child>);

impl Netns {
    fn new(name: &str) -> Netns {
        // A leftover of an interrupted run goes first (usually there is none).
        let _ = Command::new("ip")
            .args(["netns", "del", name])
            .stderr(Stdio::null())
            .status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", name])
                .status()
                .expect("ip")
                .success()
        );
        let ns = Netns(name.to_owned(), Vec::new());
        assert!(
            Command::new("ip")
                .args(["-n", name, "link", "set", "lo", "up"])
                .status()
                .expect("ip")
                .success()
        );
        ns
    }
}

impl Drop for Netns {
    fn drop(&mut self) {
        for c in &mut self.1 {
            let _ = c.kill();
            let _ = c.wait();
        }
        let _ = Command::new("ip").args(["netns", "del", &self.0]).status();
    }
}

/// Needs root: a network namespace of the test's own for knotd.
#[cfg(feature = "privileged")]
mod knot {
    use super::*;

    fn dig(ns: &str, name: &str) -> (String, Vec<String>) {
        dig_at(ns, "127.0.0.1", "5300", name)
    }

    /// `dig A` inside the namespace: the status and the sorted answers.
    fn dig_at(ns: &str, server: &str, port: &str, name: &str) -> (String, Vec<String>) {
        let at = format!("@{server}");
        let out = Command::new("ip")
            .args([
                "netns", "exec", ns, "dig", "+time=1", "+tries=2", "-p", port, &at, name, "A",
            ])
            .output()
            .expect("dig");
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let status = text
            .split("status: ")
            .nth(1)
            .and_then(|s| s.split(',').next())
            .unwrap_or("?")
            .to_owned();
        let mut answers: Vec<String> = text
            .split(";; ANSWER SECTION:")
            .nth(1)
            .map(|a| {
                a.lines()
                    .skip(1)
                    .take_while(|l| !l.trim().is_empty())
                    .filter_map(|l| l.split_whitespace().last().map(str::to_owned))
                    .collect()
            })
            .unwrap_or_default();
        answers.sort();
        (status, answers)
    }

    #[test]
    fn knot_serves_the_zone_and_a_not_ready_node_leaves_the_answers() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root: run through `cargo xtask test`"
        );
        let dir = tmpdir("knot");
        let (_, _) = render(&dir.0, &cluster(true));
        let name = format!("s8-{}-dns", std::process::id());
        let mut ns = Netns::new(&name);
        let conf = dir.0.join("knot.conf");
        let zone = [(DOMAIN.to_owned(), dir.0.join("zone.db"))];
        fs::write(&conf, xtask::knot::conf("127.0.0.1", 5300, &dir.0, &zone)).expect("conf");
        let knot = Command::new("ip")
            .args(["netns", "exec", &name, "knotd", "-c"])
            .arg(&conf)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("knotd");
        ns.1.push(knot);
        let start = Instant::now();
        while dig(&name, "jellyfin.home.example.org").0 != "NOERROR" {
            assert!(start.elapsed() < Duration::from_secs(10), "knotd did not come up");
            std::thread::sleep(Duration::from_millis(100));
        }
        let (status, answers) = dig(&name, "jellyfin.home.example.org");
        assert_eq!(
            (status.as_str(), answers.clone()),
            (
                "NOERROR",
                vec!["10.77.0.11".into(), "10.77.0.12".into(), "10.77.0.13".into()]
            )
        );
        assert_eq!(
            dig(&name, "ha.home.example.org").1.len(),
            3,
            "lan exposure answers on the LAN"
        );
        let (status, answers) = dig(&name, "gotify.home.example.org");
        assert_eq!(
            status, "NXDOMAIN",
            "a WAN-only name has no LAN answer: {answers:?}"
        );
        assert_eq!(dig(&name, "node3.garage.home.example.org").1, ["10.77.0.13"]);

        // node2 turns NotReady: re-render, reload, and measure until the answers change.
        let changed = Instant::now();
        let (zone, _) = render(&dir.0, &cluster(false));
        let reload = Command::new("ip")
            .args(["netns", "exec", &name, "knotc", "-c"])
            .arg(&conf)
            .args(["zone-reload", DOMAIN])
            .output()
            .expect("knotc");
        assert!(
            reload.status.success(),
            "{}",
            String::from_utf8_lossy(&reload.stderr)
        );
        loop {
            let (_, a) = dig(&name, "jellyfin.home.example.org");
            if a == ["10.77.0.11", "10.77.0.13"] {
                break;
            }
            assert!(
                changed.elapsed() < Duration::from_secs(10),
                "node2 still answered: {a:?}\n{zone}"
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        eprintln!(
            "NotReady node out of the answers (render + reload + first answer): {:?}",
            changed.elapsed()
        );
        assert_eq!(
            dig(&name, "node2.attic.home.example.org").1,
            ["10.77.0.12"],
            "node names stay"
        );
    }

    /// Issue 14, fallthrough: st8s answers only the names it publishes, and every other name of
    /// the domain resolves as the internet resolves it. Real software from Debian's packages
    /// stands where CoreDNS stands in deploy/examples/home: knotd serves the per-name zones that
    /// `st8s dns --zone-dir` writes, another knotd is the public authority for the domain, and
    /// unbound is the LAN resolver in front. The resolver sends a name to the st8s zones when one
    /// of them holds it and to the public authority otherwise, which is what CoreDNS's `auto` does
    /// before `forward` (plugin/auto/auto.go: a query that matches no loaded zone goes to the next
    /// plugin); here unbound's more specific stub zones do it. When the upstream stops answering,
    /// the LAN names keep working.
    #[test]
    fn names_st8s_does_not_publish_resolve_as_on_the_internet() {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root: run through `cargo xtask test`"
        );
        let dir = tmpdir("fallthrough");
        let zones = dir.0.join("zones");
        fs::write(dir.0.join("cluster.yaml"), cluster(true)).expect("write");
        let out = Command::new(st8s())
            .args(["dns", "--domain", DOMAIN, "--from-file"])
            .arg(dir.0.join("cluster.yaml"))
            .arg("--zone-dir")
            .arg(&zones)
            .output()
            .expect("st8s dns");
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        let mut origins: Vec<String> = fs::read_dir(&zones)
            .expect("zones")
            .filter_map(|e| Some(e.ok()?.file_name().to_str()?.strip_suffix(".zone")?.to_owned()))
            .collect();
        origins.sort();
        assert_eq!(
            origins,
            [
                "ha.home.example.org",
                "jellyfin.home.example.org",
                "node1.attic.home.example.org",
                "node2.attic.home.example.org",
                "node3.garage.home.example.org"
            ],
            "a zone per published name and per node, none for the wan name"
        );

        let name = format!("s8-{}-fall", std::process::id());
        let mut ns = Netns::new(&name);
        let knot = |tag: &str, listen: &str, zones: &[(String, PathBuf)]| -> PathBuf {
            let run = dir.0.join(tag);
            fs::create_dir_all(&run).expect("dir");
            let conf = xtask::knot::conf(listen, 53, &run, zones);
            let path = run.join("knot.conf");
            fs::write(&path, conf).expect("conf");
            path
        };
        // The st8s side: every zone st8s wrote.
        let lan_zones: Vec<(String, PathBuf)> = origins
            .iter()
            .map(|o| (o.clone(), zones.join(format!("{o}.zone"))))
            .collect();
        let lan = knot("lan", "127.0.0.2", &lan_zones);
        // The internet's view of the domain: the tunnel's answers for the published names,
        // a name only the internet knows, and nothing for the LAN-only name or the nodes.
        let public_zone = dir.0.join("public.zone");
        fs::write(
            &public_zone,
            "$ORIGIN home.example.org.\n$TTL 60\n@ SOA ns hostmaster 1 3600 600 86400 60\n@ NS ns\nns A 192.0.2.53\n\
             jellyfin A 203.0.113.11\ngotify A 203.0.113.10\nnas A 203.0.113.12\n",
        )
        .expect("zone");
        let public = knot("public", "127.0.0.3", &[(DOMAIN.to_owned(), public_zone)]);
        for conf in [&lan, &public] {
            let child = Command::new("ip")
                .args(["netns", "exec", &name, "knotd", "-c"])
                .arg(conf)
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("knotd");
            ns.1.push(child);
        }
        let mut unbound_conf = format!(
            "server:\n  interface: 127.0.0.1\n  port: 53\n  do-not-query-localhost: no\n  username: \"\"\n  chroot: \"\"\n  directory: \"{d}\"\n  pidfile: \"{d}/unbound.pid\"\n  use-syslog: no\n  access-control: 127.0.0.0/8 allow\n  module-config: \"iterator\"\n  num-threads: 1\n\
             stub-zone:\n  name: \"{DOMAIN}\"\n  stub-addr: 127.0.0.3\n",
            d = dir.0.display()
        );
        for origin in &origins {
            unbound_conf += &format!("stub-zone:\n  name: \"{origin}\"\n  stub-addr: 127.0.0.2\n");
        }
        let unbound_path = dir.0.join("unbound.conf");
        fs::write(&unbound_path, unbound_conf).expect("conf");
        let unbound = Command::new("ip")
            .args(["netns", "exec", &name, "unbound", "-d", "-c"])
            .arg(&unbound_path)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("unbound");
        ns.1.push(unbound);
        let resolve = |n: &str| dig_at(&name, "127.0.0.1", "53", n);
        let start = Instant::now();
        while resolve("jellyfin.home.example.org").0 != "NOERROR" {
            assert!(
                start.elapsed() < Duration::from_secs(10),
                "the resolvers did not come up"
            );
            std::thread::sleep(Duration::from_millis(100));
        }
        let lan3 = vec!["10.77.0.11".to_owned(), "10.77.0.12".into(), "10.77.0.13".into()];
        assert_eq!(
            resolve("jellyfin.home.example.org"),
            ("NOERROR".into(), lan3.clone()),
            "both: the LAN answer"
        );
        assert_eq!(
            resolve("ha.home.example.org"),
            ("NOERROR".into(), lan3),
            "lan: the LAN answer"
        );
        assert_eq!(
            resolve("gotify.home.example.org"),
            ("NOERROR".into(), vec!["203.0.113.10".to_owned()]),
            "wan: exactly the public answer, never a LAN address"
        );
        assert_eq!(
            resolve("nas.home.example.org"),
            ("NOERROR".into(), vec!["203.0.113.12".to_owned()]),
            "a name st8s does not know: the public answer"
        );
        assert_eq!(
            resolve("missing.home.example.org").0,
            "NXDOMAIN",
            "as on the internet"
        );
        assert_eq!(
            resolve("node3.garage.home.example.org").1,
            ["10.77.0.13"],
            "node names from st8s"
        );

        // The upstream stops answering: the names st8s publishes keep resolving (asked here for
        // the first time, so not from the resolver's cache); the others fail as they would.
        let public_knot = &mut ns.1[1];
        let _ = public_knot.kill();
        let _ = public_knot.wait();
        assert_eq!(
            resolve("node1.attic.home.example.org"),
            ("NOERROR".into(), vec!["10.77.0.11".to_owned()]),
            "LAN names without the upstream"
        );
        assert_ne!(
            resolve("other.home.example.org").0,
            "NOERROR",
            "the upstream is gone"
        );
    }

    /// Issue 14, "losing any one node, `st8s dns` included, leaves the names answered and
    /// current": two CoreDNS replicas as deploy/examples/home runs them, each a DNS server
    /// (knotd, rescanning like CoreDNS's `auto` with `reload 1s`) reading the zone directory its
    /// own `st8s dns` sidecar writes, both watching one API (the double, on loopback). One
    /// sidecar stops, as when its node dies: its /readyz stops answering, so the kubelet's
    /// readiness probe takes that replica out of the steered :53, and the other replica keeps
    /// answering current records through the next change.
    #[test]
    fn a_replica_whose_sidecar_stops_leaves_the_others_current() {
        use xtask::apiserver::{ApiServer, Resource, node};
        // SAFETY: geteuid has no preconditions.
        assert_eq!(
            unsafe { libc::geteuid() },
            0,
            "needs root: run through `cargo xtask test`"
        );
        let dir = tmpdir("replicas");
        let api = ApiServer::start().expect("double");
        let kubeconfig = dir.0.join("kubeconfig");
        api.write_kubeconfig(&kubeconfig).expect("kubeconfig");
        let nodes = [
            ("node1", "10.77.0.11"),
            ("node2", "10.77.0.12"),
            ("node3", "10.77.0.13"),
        ];
        for (n, ip) in nodes {
            api.apply(Resource::Node, node(n, ip, true));
            let renewed = k8s_openapi::apimachinery::pkg::apis::meta::v1::MicroTime(
                k8s_openapi::jiff::Timestamp::now(),
            );
            api.apply(
                Resource::Lease,
                serde_json::json!({"metadata": {"name": format!("st8s-agent-{n}"), "namespace": "st8s-system"},
                                   "spec": {"holderIdentity": n, "leaseDurationSeconds": 3600, "renewTime": renewed}}),
            );
        }
        api.apply(
            Resource::Ingress,
            serde_json::json!({"metadata": {"name": "jellyfin", "namespace": "media"},
                               "spec": {"rules": [{"host": "jellyfin.home.example.org"}]}}),
        );
        api.set_missing(Resource::IngressRoute, true);
        api.set_missing(Resource::HttpRoute, true);

        let name = format!("s8-{}-repl", std::process::id());
        let mut ns = Netns::new(&name);
        let mut replicas = Vec::new();
        for (tag, addr) in [("a", "127.0.0.2"), ("b", "127.0.0.3")] {
            let zones = dir.0.join(format!("zones-{tag}"));
            let port = xtask::free_port();
            // The sidecar as the example runs it: no ConfigMap, the zone directory, /readyz.
            let sidecar = Command::new(st8s())
                .args([
                    "dns",
                    "--domain",
                    DOMAIN,
                    "--namespace",
                    "st8s-system",
                    "--configmap",
                    "",
                ])
                .arg("--zone-dir")
                .arg(&zones)
                .args(["--listen", &format!("127.0.0.1:{port}"), "--peer-probe-ms", "0"])
                .env("KUBECONFIG", &kubeconfig)
                .env_remove("KUBERNETES_SERVICE_HOST")
                .stdout(Stdio::null())
                .stderr(Stdio::null())
                .spawn()
                .expect("st8s dns");
            ns.1.push(sidecar);
            let first = zones.join("jellyfin.home.example.org.zone");
            let start = Instant::now();
            while !first.exists() {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "sidecar {tag} wrote no zones"
                );
                std::thread::sleep(Duration::from_millis(20));
            }
            let server =
                xtask::knot::DirServer::start(&name, addr, 53, &dir.0.join(format!("knot-{tag}")), &zones)
                    .expect("knotd");
            replicas.push((server, port, addr));
        }
        let all: Vec<String> = nodes.iter().map(|(_, ip)| (*ip).to_owned()).collect();
        let answers = |addr: &str| dig_at(&name, addr, "53", "jellyfin.home.example.org").1;
        for (_, port, addr) in &replicas {
            let start = Instant::now();
            while answers(addr) != all || xtask::http_status(*port, "/readyz") != Some(200) {
                assert!(
                    start.elapsed() < Duration::from_secs(15),
                    "replica {addr}: {:?}, /readyz {:?}",
                    answers(addr),
                    xtask::http_status(*port, "/readyz")
                );
                std::thread::sleep(Duration::from_millis(100));
            }
        }

        // Replica a's sidecar stops (its node died, or it crashed).
        let a = &mut ns.1[0];
        let _ = a.kill();
        let _ = a.wait();
        let (port_a, port_b) = (replicas[0].1, replicas[1].1);
        assert_eq!(
            xtask::http_status(port_a, "/readyz"),
            None,
            "a replica without its sidecar fails its readiness probe"
        );
        let changed = Instant::now();
        api.apply(Resource::Node, node("node2", "10.77.0.12", false));
        let current = vec!["10.77.0.11".to_owned(), "10.77.0.13".into()];
        while answers(replicas[1].2) != current {
            assert!(
                changed.elapsed() < Duration::from_secs(5),
                "replica b still answers {:?}",
                answers(replicas[1].2)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
        let took = changed.elapsed();
        assert_eq!(xtask::http_status(port_b, "/readyz"), Some(200));
        assert_eq!(
            answers(replicas[0].2),
            all,
            "replica a is stale, which is why its readiness takes it out of service"
        );
        println!(
            "two replicas, one sidecar stopped: the other replica's DNS server dropped a NotReady node {:.0} ms after the change (1 s rescan)",
            took.as_secs_f64() * 1e3
        );
        assert!(took < Duration::from_secs(3), "{took:?}");
        drop(replicas);
    }
}
