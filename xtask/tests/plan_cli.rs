//! `st8s plan --output json` as a script reads it: the names of `st8s inspect --output json`,
//! one entry per steered port, and the problems of bad objects (with a failing exit status).

use std::process::Command;

fn plan(yaml: &str, node: &str) -> (bool, serde_json::Value) {
    let file = std::env::temp_dir().join(format!("st8s-plan-cli-{}-{node}.yaml", std::process::id()));
    std::fs::write(&file, yaml).expect("write");
    let out = Command::new(xtask::st8s_debug_bin())
        .args(["plan", "--node", node, "--output", "json", "--from-file"])
        .arg(&file)
        .output()
        .expect("st8s plan");
    let _ = std::fs::remove_file(&file);
    let json = serde_json::from_slice(&out.stdout).unwrap_or_else(|e| {
        panic!(
            "not JSON ({e}): {}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        )
    });
    (out.status.success(), json)
}

const CLUSTER: &str = r#"
apiVersion: v1
kind: List
items:
- apiVersion: v1
  kind: Node
  metadata: {name: node1}
  status: {addresses: [{type: InternalIP, address: 10.77.0.11}], conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Node
  metadata: {name: node2}
  status: {addresses: [{type: InternalIP, address: 10.77.0.12}], conditions: [{type: Ready, status: "True"}]}
- apiVersion: v1
  kind: Pod
  metadata: {name: web, namespace: lab}
  spec: {nodeName: node1, containers: [{name: c, ports: [{containerPort: 8080, hostPort: 80}]}]}
  status: {podIP: 10.244.1.2, conditions: [{type: Ready, status: "True"}]}
"#;

#[test]
fn plan_prints_json_with_the_inspect_names() {
    let (ok, j) = plan(CLUSTER, "node1");
    assert!(ok, "{j}");
    assert_eq!(j["node"], "node1");
    assert_eq!(j["node_addr"], "10.77.0.11");
    assert_eq!(j["ports"][0]["port"], "80/tcp");
    assert_eq!(j["ports"][0]["local"], "10.244.1.2:8080");
    assert_eq!(j["ports"][0]["backends"][0]["node_addr"], "10.77.0.11");
    let (ok, j) = plan(CLUSTER, "node2");
    assert!(ok);
    assert!(j["ports"][0]["local"].is_null(), "node2 runs no backend: {j}");
    assert_eq!(j["ports"][0]["backends"][0]["node"], "node1");

    let bad = CLUSTER.replace("hostPort: 80}", "hostPort: 80, protocol: SCTP}");
    let (ok, j) = plan(&bad, "node1");
    assert!(!ok, "a problem fails the command");
    let problems = j["problems"].as_array().expect("problems");
    assert!(
        problems.iter().any(|p| p
            .as_str()
            .is_some_and(|p| p.contains("lab/web") && p.contains("SCTP"))),
        "{j}"
    );
}
