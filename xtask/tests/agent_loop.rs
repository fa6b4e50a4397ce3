//! The agent's loop (`st8s agent` on the Kubernetes API) with the kernel replaced: the real
//! kube-rs watchers against the API-server double, the real core and runner, and a dataplane that
//! records every table it is given and fails when told to. Sync, retries, draining, settling and
//! failover, as a normal user, in seconds.

use std::{
    collections::BTreeSet,
    net::Ipv4Addr,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use clap::Parser as _;
use st8s::{
    agent::{self, AgentArgs},
    core::{Desired, NodeEntry, PortId, Proto},
    dataplane::{ApplyReport, Dataplane, Host, Macs},
    http::{ErrorKind, Metrics},
    sources::probe::Prober,
};
use tokio::sync::{mpsc, oneshot};
use xtask::apiserver::{ApiServer, Resource, node, pod};

const WEB: PortId = PortId {
    port: 80,
    proto: Proto::Tcp,
};

#[derive(Clone, Debug, PartialEq)]
enum Call {
    Load(String),
    Apply(Desired),
    Attach,
}

/// What the fake kernel was asked to do, and how many of the next writes must fail.
#[derive(Clone, Default)]
struct Record(Arc<Mutex<(Vec<Call>, usize)>>);

impl Record {
    fn calls(&self) -> Vec<Call> {
        self.0.lock().expect("lock").0.clone()
    }
    fn push(&self, c: Call) {
        self.0.lock().expect("lock").0.push(c);
    }
    fn fail_next(&self, n: usize) {
        self.0.lock().expect("lock").1 = n;
    }
    /// The last table written.
    fn table(&self) -> Option<Desired> {
        self.calls().into_iter().rev().find_map(|c| match c {
            Call::Apply(d) => Some(d),
            _ => None,
        })
    }
}

struct FakeHost(Record);
struct FakeDataplane(Record);

impl Host for FakeHost {
    type Dataplane = FakeDataplane;
    fn load(&mut self, self_node: &NodeEntry) -> anyhow::Result<FakeDataplane> {
        self.0.push(Call::Load(self_node.name.clone()));
        Ok(FakeDataplane(self.0.clone()))
    }
    /// Every peer's MAC is known: its address in the last four bytes.
    fn peer_macs(&mut self, desired: &Desired) -> Macs {
        desired
            .nodes
            .keys()
            .filter(|a| **a != desired.self_node.addr)
            .map(|a| {
                let o = a.octets();
                (*a, [2, 0, o[0], o[1], o[2], o[3]])
            })
            .collect()
    }
}

impl Dataplane for FakeDataplane {
    fn apply(&mut self, table: &Desired, _: &Macs) -> anyhow::Result<ApplyReport> {
        {
            let mut r = self.0.0.lock().expect("lock");
            if r.1 > 0 {
                r.1 -= 1;
                anyhow::bail!("injected map write failure");
            }
        }
        self.0.push(Call::Apply(table.clone()));
        Ok(ApplyReport::default())
    }
    fn attach(&mut self) -> anyhow::Result<()> {
        self.0.push(Call::Attach);
        Ok(())
    }
}

#[derive(clap::Parser)]
struct Cli {
    #[command(flatten)]
    agent: AgentArgs,
}

/// A running loop for `node3`, and what it needs to be observed and stopped.
struct Agent {
    record: Record,
    metrics: Arc<Metrics>,
    unreachable: mpsc::Sender<BTreeSet<Ipv4Addr>>,
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<anyhow::Result<()>>,
}

impl Agent {
    fn start(api: &ApiServer, extra: &[&str]) -> Self {
        let mut argv = vec![
            "st8s",
            "--node",
            "node3",
            "--lease-seconds",
            "0",
            "--poll-ms",
            "50",
            "--settle-ms",
            "300",
        ];
        argv.extend_from_slice(extra);
        let args = Cli::try_parse_from(argv).expect("the agent's own flags").agent;
        let mut config = kube::Config::new(format!("http://{}", api.addr).parse().expect("url"));
        config.read_timeout = Some(Duration::from_secs(5));
        let client = kube::Client::try_from(config).expect("client");
        let record = Record::default();
        let metrics = Arc::new(Metrics::default());
        let (prober, unreachable) = Prober::manual();
        let (stop, stopped) = oneshot::channel::<()>();
        let (host, m) = (FakeHost(record.clone()), metrics.clone());
        let task = tokio::spawn(async move {
            let shutdown = async move {
                let _ = stopped.await;
            };
            agent::run_kube(&args, client, host, prober, m, shutdown)
                .await
                .map(drop)
        });
        Agent {
            record,
            metrics,
            unreachable,
            stop: Some(stop),
            task,
        }
    }

    /// Waits (at most `secs`) until the last table written satisfies `done`.
    async fn until(&self, secs: u64, what: &str, done: impl Fn(&Desired) -> bool) -> Desired {
        self.wait(secs, what, |r| r.table().filter(|t| done(t))).await
    }

    /// Waits (at most `secs`) until some table written so far satisfies `done` (one that may
    /// have been replaced since).
    async fn until_seen(&self, secs: u64, what: &str, done: impl Fn(&Desired) -> bool) -> Desired {
        self.wait(secs, what, |r| {
            r.calls().into_iter().find_map(|c| match c {
                Call::Apply(t) if done(&t) => Some(t),
                _ => None,
            })
        })
        .await
    }

    async fn wait(&self, secs: u64, what: &str, found: impl Fn(&Record) -> Option<Desired>) -> Desired {
        let deadline = Instant::now() + Duration::from_secs(secs);
        loop {
            if let Some(t) = found(&self.record) {
                return t;
            }
            assert!(
                Instant::now() < deadline,
                "{what}: not within {secs} s; last table {:#?}",
                self.record.table().map(|t| t.ports)
            );
            assert!(!self.task.is_finished(), "{what}: the loop stopped");
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
    }

    async fn stop(mut self) {
        let _ = self.stop.take().map(|s| s.send(()));
        tokio::time::timeout(Duration::from_secs(5), self.task)
            .await
            .expect("the loop stops on shutdown")
            .expect("task")
            .expect("the loop ends cleanly");
    }
}

/// `(node, draining)` of the web port's backends.
fn web(t: &Desired) -> Vec<(String, bool)> {
    t.ports
        .get(&WEB)
        .map(|p| p.backends.iter().map(|b| (b.node.clone(), b.draining)).collect())
        .unwrap_or_default()
}

fn held(node: &str, draining: bool) -> (String, bool) {
    (node.to_owned(), draining)
}

fn cluster(api: &ApiServer) {
    for (n, ip) in [
        ("node1", "127.0.0.11"),
        ("node2", "127.0.0.12"),
        ("node3", "127.0.0.13"),
    ] {
        api.apply(Resource::Node, node(n, ip, true));
    }
    api.apply(
        Resource::Pod,
        pod("web-a", "node1", "10.244.1.10", 80, 8080, "TCP"),
    );
}

/// The cluster with web pods on node1 and node2, and node3's agent once it has both.
async fn two_backends() -> (ApiServer, Agent) {
    let api = ApiServer::start().expect("double");
    cluster(&api);
    api.apply(
        Resource::Pod,
        pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP"),
    );
    let agent = Agent::start(&api, &[]);
    agent.until(10, "first table", |t| web(t).len() == 2).await;
    (api, agent)
}

#[tokio::test]
async fn programs_before_it_attaches_then_reports_ready() {
    let api = ApiServer::start().expect("double");
    cluster(&api);
    let agent = Agent::start(&api, &[]);
    assert!(!agent.metrics.is_ready(), "not ready before the first list");
    agent
        .until(10, "first table", |t| web(t) == [held("node1", false)])
        .await;
    let deadline = Instant::now() + Duration::from_secs(5);
    while !agent.metrics.is_ready() {
        assert!(Instant::now() < deadline, "ready after the first sync");
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let calls = agent.record.calls();
    assert_eq!(calls[0], Call::Load("node3".into()));
    assert!(matches!(calls[1], Call::Apply(_)), "{calls:?}");
    assert_eq!(calls[2], Call::Attach, "attached only after the first write");
    agent.stop().await;
}

#[tokio::test]
async fn a_new_remote_backend_settles_before_it_takes_new_flows() {
    let api = ApiServer::start().expect("double");
    cluster(&api);
    let agent = Agent::start(&api, &[]);
    agent.until(10, "first table", |t| !web(t).is_empty()).await;
    api.apply(
        Resource::Pod,
        pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP"),
    );
    let seen = Instant::now();
    agent
        .until_seen(5, "node2 held", |t| {
            web(t) == [held("node1", false), held("node2", true)]
        })
        .await;
    agent
        .until(5, "node2 settled", |t| {
            web(t) == [held("node1", false), held("node2", false)]
        })
        .await;
    assert!(
        seen.elapsed() >= Duration::from_millis(300),
        "settled after --settle-ms, not before: {:?}",
        seen.elapsed()
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_pod_that_turns_not_ready_drains_and_a_deleted_one_leaves() {
    let (api, agent) = two_backends().await;
    let mut unready = pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP");
    unready["status"]["conditions"][0]["status"] = "False".into();
    api.apply(Resource::Pod, unready);
    agent
        .until(5, "node2 draining", |t| {
            web(t) == [held("node1", false), held("node2", true)]
        })
        .await;
    api.delete(Resource::Pod, "lab/web-b");
    agent
        .until(5, "node2 gone", |t| web(t) == [held("node1", false)])
        .await;
    agent.stop().await;
}

/// Issue 15: a rolling update deletes a pod that is still Ready (deletionTimestamp set, the
/// Ready condition still True while it shuts down): it drains at once, as a NotReady one does.
#[tokio::test]
async fn a_ready_pod_being_deleted_drains() {
    let (api, agent) = two_backends().await;
    let mut going = pod("web-b", "node2", "10.244.2.10", 80, 8080, "TCP");
    going["metadata"]["deletionTimestamp"] = "2026-11-25T10:00:00Z".into();
    api.apply(Resource::Pod, going);
    agent
        .until(5, "node2 draining", |t| {
            web(t) == [held("node1", false), held("node2", true)]
        })
        .await;
    agent.stop().await;
}

#[tokio::test]
async fn failed_writes_are_retried_until_they_land() {
    let api = ApiServer::start().expect("double");
    cluster(&api);
    let agent = Agent::start(&api, &[]);
    agent.until(10, "first table", |t| !web(t).is_empty()).await;
    agent.record.fail_next(3);
    api.delete(Resource::Pod, "lab/web-a");
    agent.until(5, "the delete lands", |t| web(t).is_empty()).await;
    assert_eq!(
        agent.metrics.errors(ErrorKind::MapWrite),
        3,
        "each failed write counted"
    );
    agent.stop().await;
}

#[tokio::test]
async fn a_silent_peer_loses_its_backends_until_it_answers() {
    let (_api, agent) = two_backends().await;
    let node1: Ipv4Addr = "127.0.0.11".parse().expect("address");
    agent.unreachable.send([node1].into()).await.expect("prober");
    agent
        .until(5, "node1 cut", |t| web(t) == [held("node2", false)])
        .await;
    // Both silent: a port whose every backend looks down keeps them all.
    let node2: Ipv4Addr = "127.0.0.12".parse().expect("address");
    agent
        .unreachable
        .send([node1, node2].into())
        .await
        .expect("prober");
    agent
        .until(5, "panic mode", |t| {
            web(t) == [held("node1", false), held("node2", false)]
        })
        .await;
    agent.unreachable.send([node2].into()).await.expect("prober");
    agent
        .until(5, "node2 cut", |t| web(t) == [held("node1", false)])
        .await;
    agent.unreachable.send(BTreeSet::new()).await.expect("prober");
    agent.until(5, "all back", |t| web(t).len() == 2).await;
    agent.stop().await;
}
