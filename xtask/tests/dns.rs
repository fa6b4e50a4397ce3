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
    let out = Command::new("named-checkzone")
        .arg(DOMAIN)
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
}

struct Netns(String, Vec<Child>);
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
        let out = Command::new("ip")
            .args([
                "netns",
                "exec",
                ns,
                "dig",
                "+time=1",
                "+tries=2",
                "-p",
                "5300",
                "@127.0.0.1",
                name,
                "A",
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
        let _ = Command::new("ip").args(["netns", "del", &name]).status();
        assert!(
            Command::new("ip")
                .args(["netns", "add", &name])
                .status()
                .expect("ip")
                .success()
        );
        let mut ns = Netns(name.clone(), Vec::new());
        assert!(
            Command::new("ip")
                .args(["-n", &name, "link", "set", "lo", "up"])
                .status()
                .expect("ip")
                .success()
        );
        let conf = dir.0.join("knot.conf");
        fs::write(
            &conf,
            format!(
                "server:\n  listen: 127.0.0.1@5300\n  rundir: {d}\ndatabase:\n  storage: {d}/db\nlog:\n  - target: stderr\n    any: warning\nzone:\n  - domain: {DOMAIN}\n    file: {d}/zone.db\n    zonefile-load: whole\n",
                d = dir.0.display()
            ),
        )
        .expect("conf");
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
}
