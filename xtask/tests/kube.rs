//! The agent's Kubernetes source against the API-server double: the real kube-rs watchers, the
//! real list/watch protocol, the pure core behind them. No kernel needed.

use std::time::Duration;

use st8s::{
    core::{PortId, Proto, plan},
    sources::kube::{self as kube_source, Effect, KubeState, Msg, WatchFailure},
};
use tokio::sync::mpsc::Receiver;
use xtask::apiserver::{ApiServer, Resource, node, pod};

const WEB: PortId = PortId {
    port: 80,
    proto: Proto::Tcp,
};

fn client(api: &ApiServer) -> kube::Client {
    let mut config = kube::Config::new(format!("http://{}", api.addr).parse().expect("url"));
    config.read_timeout = Some(Duration::from_secs(5));
    kube::Client::try_from(config).expect("client")
}

fn cluster_of_three(api: &ApiServer) {
    for (n, ip) in [
        ("node1", "10.77.0.11"),
        ("node2", "10.77.0.12"),
        ("node3", "10.77.0.13"),
    ] {
        api.apply(Resource::Node, node(n, ip, true));
    }
    api.apply(
        Resource::Pod,
        pod("web-a", "node1", "10.244.1.10", 80, 8080, "TCP"),
    );
}

/// Feeds messages into the state until `done` holds, or fails after `secs`.
async fn until(
    rx: &mut Receiver<Msg>,
    state: &mut KubeState,
    secs: u64,
    mut done: impl FnMut(&KubeState, &Effect) -> bool,
) -> Vec<Effect> {
    let deadline = tokio::time::Instant::now() + Duration::from_secs(secs);
    let mut effects = Vec::new();
    loop {
        let msg = tokio::time::timeout_at(deadline, rx.recv())
            .await
            .unwrap_or_else(|_| panic!("condition not reached within {secs}s; effects so far: {effects:?}"))
            .expect("watchers running");
        let e = state.handle(msg);
        let stop = done(state, &e);
        effects.push(e);
        if stop {
            return effects;
        }
    }
}

fn backends(state: &KubeState) -> Vec<String> {
    let p = plan(&state.cluster, "node3").expect("plans");
    p.desired
        .ports
        .get(&WEB)
        .map(|p| p.backends.iter().map(|b| b.node.clone()).collect())
        .unwrap_or_default()
}

#[tokio::test]
async fn initial_sync_then_backends_added_moved_and_deleted() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    until(&mut rx, &mut state, 10, |s, _| s.synced()).await;
    assert_eq!(state.cluster.nodes.len(), 3);
    assert_eq!(backends(&state), ["node1"]);

    api.apply(
        Resource::Pod,
        pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP"),
    );
    until(&mut rx, &mut state, 5, |s, e| e.changed && backends(s).len() == 2).await;
    assert_eq!(backends(&state), ["node1", "node2"]);

    // Move web-a from node1 to node3 (a new pod, the old one deleted).
    api.delete(Resource::Pod, "lab/web-a");
    api.apply(
        Resource::Pod,
        pod("web-a2", "node3", "10.244.3.10", 80, 8080, "TCP"),
    );
    until(&mut rx, &mut state, 5, |s, _| backends(s) == ["node2", "node3"]).await;
    let local = plan(&state.cluster, "node3").expect("plans").desired.ports[&WEB]
        .local
        .clone();
    assert_eq!(local.map(|l| l.pod), Some("lab/web-a2".to_owned()));

    api.delete(Resource::Pod, "lab/web-b");
    api.delete(Resource::Pod, "lab/web-a2");
    until(&mut rx, &mut state, 5, |s, _| backends(s).is_empty()).await;
    let reqs = api.requests();
    assert!(
        reqs.iter().any(|r| r.contains("watch=true")),
        "the source watches: {reqs:?}"
    );
}

#[tokio::test]
async fn a_node_turning_not_ready_drops_its_backends() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    api.apply(
        Resource::Pod,
        pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP"),
    );
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    until(&mut rx, &mut state, 10, |s, _| s.synced()).await;
    assert_eq!(backends(&state), ["node1", "node2"]);
    api.apply(Resource::Node, node("node1", "10.77.0.11", false));
    until(&mut rx, &mut state, 5, |s, _| backends(s) == ["node2"]).await;
    api.apply(Resource::Node, node("node1", "10.77.0.11", true));
    until(&mut rx, &mut state, 5, |s, _| backends(s) == ["node1", "node2"]).await;
}

#[tokio::test]
async fn gone_410_leads_to_a_relist_that_also_catches_missed_deletes() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    api.apply(
        Resource::Pod,
        pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP"),
    );
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    until(&mut rx, &mut state, 10, |s, _| s.synced()).await;
    // The history is compacted and web-b goes away unseen: only a relist can tell.
    api.set_down(true);
    // Every open watch must have ended before the delete, or it would carry the delete as an
    // event and no relist would be needed.
    let deadline = std::time::Instant::now() + Duration::from_secs(5);
    while api.open_watches() > 0 {
        assert!(std::time::Instant::now() < deadline, "the watches never ended");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    api.delete(Resource::Pod, "lab/web-b");
    api.compact();
    api.set_down(false);
    until(&mut rx, &mut state, 20, |s, _| {
        backends(s) == ["node1"] && s.healthy()
    })
    .await;
    let lists = api
        .requests()
        .iter()
        .filter(|r| r.contains("/api/v1/pods") && !r.contains("watch=true"))
        .count();
    assert!(lists >= 2, "a relist happened ({lists} lists)");
}

#[tokio::test]
async fn an_api_outage_keeps_the_state_and_recovers() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    until(&mut rx, &mut state, 10, |s, _| s.synced()).await;
    api.set_down(true);
    let effects = until(&mut rx, &mut state, 20, |s, _| !s.healthy()).await;
    let failure = effects
        .iter()
        .find_map(|e| e.new_failure)
        .expect("a failure reported");
    assert_eq!(failure.1, WatchFailure::Unreachable, "{effects:?}");
    assert_eq!(backends(&state), ["node1"], "the last known state stays");
    assert_eq!(state.cluster.nodes.len(), 3);
    // While down, changes happen; after the outage they arrive.
    api.apply(
        Resource::Pod,
        pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP"),
    );
    api.set_down(false);
    until(&mut rx, &mut state, 30, |s, _| {
        s.healthy() && backends(s).len() == 2
    })
    .await;
}

#[tokio::test]
async fn a_forbidden_list_is_reported_as_such() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    api.set_forbidden(Resource::Pod, true);
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    let effects = until(&mut rx, &mut state, 10, |_, e| {
        e.new_failure.is_some_and(|f| f.0 == Resource::Pod)
    })
    .await;
    let f = effects.iter().find_map(|e| e.new_failure).expect("failure");
    assert_eq!(f.1, WatchFailure::Forbidden);
    assert!(!state.synced(), "not synced without pods");
    api.set_forbidden(Resource::Pod, false);
    until(&mut rx, &mut state, 30, |s, _| s.healthy()).await;
    assert_eq!(backends(&state), ["node1"]);
}

#[tokio::test]
async fn dropped_watches_and_bookmarks_lose_no_event() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    until(&mut rx, &mut state, 10, |s, _| s.synced()).await;
    for i in 0..5u16 {
        api.bookmark();
        api.drop_connections();
        api.apply(
            Resource::Pod,
            pod(
                &format!("dns-{i}"),
                "node2",
                &format!("10.244.2.{}", 20 + i),
                53,
                53,
                "UDP",
            ),
        );
    }
    until(&mut rx, &mut state, 20, |s, _| s.cluster.pods.len() == 6).await;
    let p = plan(&state.cluster, "node1").expect("plans");
    assert!(
        p.problems
            .iter()
            .any(|p| p.to_string().contains("both claim hostPort 53/udp")),
        "{:?}",
        p.problems
    );
}

#[tokio::test]
async fn bad_objects_are_skipped_by_name_and_the_rest_applies() {
    let api = ApiServer::start().expect("double");
    cluster_of_three(&api);
    api.apply(
        Resource::Node,
        serde_json::json!({"metadata": {"name": "node9"}, "status": {}}),
    );
    let mut no_ip = pod("web-noip", "node2", "", 80, 8080, "TCP");
    no_ip["status"].as_object_mut().expect("status").remove("podIP");
    api.apply(Resource::Pod, no_ip);
    let mut odd = pod("web-odd", "node3", "10.244.3.10", 80, 8080, "TCP");
    odd["metadata"]["annotations"] = serde_json::json!({"st8s.io/steer": "perhaps"});
    api.apply(Resource::Pod, odd);
    let (stores, mut rx) = kube_source::spawn_watchers(client(&api));
    let mut state = KubeState::new(stores);
    until(&mut rx, &mut state, 10, |s, _| s.synced()).await;
    let p = plan(&state.cluster, "node1").expect("plans despite bad objects");
    let problems: Vec<String> = p.problems.iter().map(|p| p.to_string()).collect();
    assert!(problems.iter().any(|p| p.contains("node node9")), "{problems:?}");
    assert!(
        problems.iter().any(|p| p.contains("lab/web-noip")),
        "{problems:?}"
    );
    assert!(
        problems
            .iter()
            .any(|p| p.contains("lab/web-odd") && p.contains("perhaps")),
        "{problems:?}"
    );
    assert_eq!(backends(&state), ["node1"], "the good pod is still steered");
}
