//! The Kubernetes source: Nodes and Pods through kube-rs watchers into reflector stores, and the
//! watcher machinery ([`Watchers`], [`WatchStatus`]) that `st8s dns` uses for its kinds too.
//!
//! Each watcher keeps a kube-rs store (a relist replaces the store's contents as a whole once it
//! is complete, so that objects deleted while the watch was down disappear too) and tells the
//! agent, with the time the event arrived, that its store changed. [`KubeState`] reads the stores
//! into the same [`Cluster`] the file source produces; it is tested without an API server.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{
    api::core::v1::{Node, NodeStatus},
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{
        WatchStreamExt as _,
        reflector::{self, Store},
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;

use super::{
    k8s,
    resource::{Resource, slim_resource},
};
use crate::core::{self, Cluster};

/// One message from a watcher task.
#[derive(Debug)]
pub enum Msg {
    /// The watcher made progress; `changed`: its store changed (an object applied or deleted,
    /// or a list completed), `listed`: a list completed.
    Event {
        kind: Resource,
        at: Instant,
        changed: bool,
        listed: bool,
    },
    /// The watcher failed; it retries with backoff. `message` is the error itself.
    Failed {
        kind: Resource,
        failure: WatchFailure,
        message: String,
    },
    /// A failing kind can be listed again (a quiet resource sends no event when its watch comes
    /// back, so recovery is probed).
    Reachable(Resource),
}

/// Why a watch failed, as far as the operator is concerned. Code branches on the variant; the
/// metric label and the log name it with [`label`](Self::label).
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum WatchFailure {
    /// 410 Gone: the resource version expired. Routine: the watcher relists.
    Gone,
    /// 403: RBAC does not allow the list or watch.
    Forbidden,
    /// 401: the credentials are not accepted.
    Unauthorized,
    /// 404: the API does not serve the resource (a CRD that is not installed).
    NotServed,
    /// Any other status from the API.
    ApiError,
    /// No connection to the API server.
    Unreachable,
    /// An error event inside the watch stream.
    WatchError,
    /// A list without a resourceVersion.
    Protocol,
    /// Anything else.
    Other,
}

impl WatchFailure {
    pub const ALL: [Self; 9] = [
        Self::Gone,
        Self::Forbidden,
        Self::Unauthorized,
        Self::NotServed,
        Self::ApiError,
        Self::Unreachable,
        Self::WatchError,
        Self::Protocol,
        Self::Other,
    ];

    pub fn of(e: &watcher::Error) -> Self {
        let client = match e {
            watcher::Error::InitialListFailed(c)
            | watcher::Error::WatchStartFailed(c)
            | watcher::Error::WatchFailed(c) => c,
            watcher::Error::WatchError(s) if s.code == 410 => return Self::Gone,
            watcher::Error::WatchError(_) => return Self::WatchError,
            watcher::Error::NoResourceVersion => return Self::Protocol,
        };
        match client {
            kube::Error::Api(s) if s.code == 403 => Self::Forbidden,
            kube::Error::Api(s) if s.code == 401 => Self::Unauthorized,
            kube::Error::Api(s) if s.code == 410 => Self::Gone,
            kube::Error::Api(s) if s.code == 404 => Self::NotServed,
            kube::Error::Api(_) => Self::ApiError,
            kube::Error::HyperError(_) | kube::Error::Service(_) | kube::Error::ReadEvents(_) => {
                Self::Unreachable
            }
            _ => Self::Other,
        }
    }

    /// The `kind` label of `st8s_errors_total`, and the name in logs.
    pub const fn label(self) -> &'static str {
        match self {
            Self::Gone => "gone",
            Self::Forbidden => "forbidden",
            Self::Unauthorized => "unauthorized",
            Self::NotServed => "not_served",
            Self::ApiError => "api_error",
            Self::Unreachable => "api_unreachable",
            Self::WatchError => "watch_error",
            Self::Protocol => "protocol",
            Self::Other => "watch_failed",
        }
    }
}

impl fmt::Display for WatchFailure {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.label())
    }
}

/// A Pod as st8s watches it: only the fields the plan reads are deserialized (everything else in
/// the API's JSON is skipped while parsing, never allocated), which is what keeps a full list of
/// a large cluster fast and the agent small.
#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct WatchedPod {
    #[serde(deserialize_with = "k8s::slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<WatchedPodSpec>,
    #[serde(default)]
    pub status: Option<WatchedPodStatus>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPodSpec {
    #[serde(default)]
    pub node_name: Option<String>,
    #[serde(default)]
    pub host_network: Option<bool>,
    #[serde(default)]
    pub containers: Vec<WatchedContainer>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct WatchedContainer {
    #[serde(default)]
    pub name: String,
    #[serde(default)]
    pub ports: Vec<WatchedPort>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPort {
    #[serde(default)]
    pub container_port: i32,
    #[serde(default)]
    pub host_port: Option<i32>,
    #[serde(default)]
    pub protocol: Option<String>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
#[serde(rename_all = "camelCase")]
pub struct WatchedPodStatus {
    #[serde(default, rename = "podIP")]
    pub pod_ip: Option<String>,
    #[serde(default, rename = "podIPs")]
    pub pod_ips: Vec<WatchedPodIp>,
    #[serde(default)]
    pub conditions: Vec<WatchedCondition>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct WatchedPodIp {
    #[serde(default)]
    pub ip: String,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct WatchedCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

slim_resource!(WatchedPod, Resource::Pod, k8s_openapi::NamespaceResourceScope);

impl WatchedPod {
    /// `namespace/name`, as [`core::Pod::key`] spells it.
    pub fn key(&self) -> String {
        k8s::pod_key(self.metadata.namespace.as_deref(), self.metadata.name.as_deref())
    }

    /// The pod as the core reads it, or nothing when it declares no hostPort (such a pod can
    /// never matter: a pod's ports are immutable).
    pub fn to_pod(&self) -> Option<core::Pod> {
        let spec = self.spec.as_ref()?;
        let status = self.status.as_ref();
        k8s::core_pod(k8s::PodParts {
            namespace: self.metadata.namespace.clone(),
            name: self.metadata.name.clone(),
            annotations: self.metadata.annotations.as_ref(),
            node: spec.node_name.clone(),
            ip: status.and_then(|s| s.pod_ip.clone()),
            ips: status
                .map(|s| s.pod_ips.iter().map(|p| p.ip.clone()).collect())
                .unwrap_or_default(),
            ready: status.is_some_and(|s| {
                s.conditions
                    .iter()
                    .any(|c| c.type_ == "Ready" && c.status == "True")
            }),
            terminating: self.metadata.deletion_timestamp.is_some(),
            host_network: spec.host_network.unwrap_or(false),
            ports: spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .map(|p| (p.host_port, p.container_port, p.protocol.as_deref())),
        })
    }
}

/// The stores the watchers keep.
#[derive(Clone)]
pub struct Stores {
    pub nodes: Store<Node>,
    pub pods: Store<WatchedPod>,
}

impl Stores {
    /// The cluster as the stores hold it now.
    pub fn cluster(&self) -> Cluster {
        let mut c = Cluster::default();
        for n in self.nodes.state() {
            c.upsert_node(k8s::node(&n));
        }
        for p in self.pods.state() {
            if let Some(p) = p.to_pod() {
                c.upsert_pod(p);
            }
        }
        c
    }
}

/// What the watchers of a set of kinds have reported: which kinds have completed a list, which
/// are failing and how, which optional kinds the API does not serve. The agent and `st8s dns`
/// both keep one; it is tested without an API server.
#[derive(Debug, Default)]
pub struct WatchStatus {
    listed: BTreeSet<Resource>,
    failing: BTreeMap<Resource, WatchFailure>,
    /// Optional kinds (custom resources) whose CRD is not installed: none of them exist.
    absent: BTreeSet<Resource>,
}

/// What one message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// What is read from the stores may have changed (an object, a completed list, a kind
    /// found absent or present again). For [`KubeState::handle`]: the cluster changed.
    pub changed: bool,
    /// This kind completed its first list (a change even if the store holds nothing).
    pub first_list: bool,
    /// The watcher of this kind failed with a new kind of error (worth one log line).
    pub new_failure: Option<(Resource, WatchFailure)>,
    /// This kind's watcher recovered from a failure.
    pub recovered: Option<Resource>,
    /// This optional kind turned out not to be served (worth one log line).
    pub absent: Option<Resource>,
}

impl WatchStatus {
    /// Every kind of `kinds` has completed a list, or is optional and not served: only then is
    /// the view whole (a plan or a zone from half a view would drop good entries).
    pub fn synced(&self, kinds: &[Resource]) -> bool {
        kinds
            .iter()
            .all(|k| self.listed.contains(k) || (k.optional() && self.absent.contains(k)))
    }

    pub fn failing(&self) -> impl Iterator<Item = (Resource, WatchFailure)> + '_ {
        self.failing.iter().map(|(k, f)| (*k, *f))
    }

    /// The kind is optional and not served: its store is not to be read (it may hold what was
    /// there before the CRD went away).
    pub fn absent(&self, kind: Resource) -> bool {
        self.absent.contains(&kind)
    }

    pub fn take(&mut self, msg: &Msg) -> Effect {
        let mut effect = Effect::default();
        match *msg {
            Msg::Reachable(kind) => {
                if self.failing.remove(&kind).is_some() {
                    effect.recovered = Some(kind);
                }
            }
            Msg::Failed {
                kind,
                failure: WatchFailure::NotServed,
                ..
            } if kind.optional() => {
                if self.absent.insert(kind) {
                    effect.absent = Some(kind);
                    effect.changed = true;
                }
            }
            Msg::Failed { kind, failure, .. } => {
                if self.failing.insert(kind, failure) != Some(failure) {
                    effect.new_failure = Some((kind, failure));
                }
            }
            Msg::Event {
                kind,
                changed,
                listed,
                ..
            } => {
                if self.failing.remove(&kind).is_some() {
                    effect.recovered = Some(kind);
                }
                effect.changed = changed | self.absent.remove(&kind);
                effect.first_list = listed && self.listed.insert(kind);
            }
        }
        effect
    }
}

/// Logs what one message meant, once per new state: a relist after 410 Gone, a failure (until the
/// kind recovers or fails differently), a recovery, an optional kind found not served.
/// `what_stays` says what the program keeps serving meanwhile.
pub fn log_effect(msg: &Msg, effect: &Effect, what_stays: &str) {
    match (msg, effect.new_failure) {
        (
            Msg::Failed {
                kind,
                failure: WatchFailure::Gone,
                ..
            },
            _,
        ) => tracing::info!(watch = %kind, "resource version expired (410 Gone): relisting"),
        (Msg::Failed { message, .. }, Some((kind, failure))) => tracing::error!(
            watch = %kind,
            error = %failure,
            detail = %message,
            stays = what_stays,
            "watch failed; retrying with backoff"
        ),
        _ => {}
    }
    if let Some(kind) = effect.recovered {
        tracing::info!(watch = %kind, "watch recovered");
    }
    if let Some(kind) = effect.absent {
        tracing::info!(watch = %kind, "not served by the API (CRD not installed); none to read");
    }
}

/// The agent's kinds.
const AGENT_KINDS: [Resource; 2] = [Resource::Node, Resource::Pod];

/// The cluster as the watchers have reported it so far.
pub struct KubeState {
    stores: Stores,
    pub cluster: Cluster,
    status: WatchStatus,
    /// A store changed since `cluster` was read from them.
    stale: bool,
    /// A kind completed its first list since then (a change even if nothing differs).
    first_list: bool,
}

impl KubeState {
    pub fn new(stores: Stores) -> Self {
        KubeState {
            stores,
            cluster: Cluster::default(),
            status: WatchStatus::default(),
            stale: false,
            first_list: false,
        }
    }

    /// Both watchers have completed a list at least once.
    pub fn synced(&self) -> bool {
        self.status.synced(&AGENT_KINDS)
    }

    /// Synced, and no watcher is failing right now.
    pub fn healthy(&self) -> bool {
        self.synced() && self.status.failing.is_empty()
    }

    pub fn failing(&self) -> impl Iterator<Item = (Resource, WatchFailure)> + '_ {
        self.status.failing()
    }

    /// Takes one message in and reads the stores again if it changed them.
    pub fn handle(&mut self, msg: Msg) -> Effect {
        let mut effect = self.take(&msg);
        effect.changed = self.refresh();
        effect
    }

    /// Takes one message in without reading the stores yet (`changed` says only that they may
    /// have changed): a burst of events is read once, by [`refresh`](Self::refresh).
    pub fn take(&mut self, msg: &Msg) -> Effect {
        let effect = self.status.take(msg);
        self.stale |= effect.changed;
        self.first_list |= effect.first_list;
        effect
    }

    /// Reads the stores into `cluster` if they changed; whether the cluster did (a kind's first
    /// complete list counts as a change).
    pub fn refresh(&mut self) -> bool {
        if !self.stale {
            return false;
        }
        let fresh = self.stores.cluster();
        let changed = std::mem::take(&mut self.first_list) || fresh != self.cluster;
        self.cluster = fresh;
        self.stale = false;
        changed
    }
}

/// A pod without hostPorts never matters (a pod's ports cannot change): the store keeps its name
/// only.
pub fn name_only_without_host_ports(p: &mut WatchedPod) {
    let has_host_port = p
        .spec
        .iter()
        .flat_map(|s| &s.containers)
        .flat_map(|c| &c.ports)
        .any(|port| port.host_port.is_some());
    if !has_host_port {
        p.spec = None;
        p.status = None;
        p.metadata.annotations = None;
    }
}

/// Keeps only what st8s reads of a Node (its name, InternalIP and Ready condition): the store
/// holds every node, and managedFields and images are most of a Node's size.
pub fn slim_node(n: &mut Node) {
    n.metadata = ObjectMeta {
        name: n.metadata.name.take(),
        resource_version: n.metadata.resource_version.take(),
        ..ObjectMeta::default()
    };
    n.spec = None;
    n.status = n.status.take().map(|s| NodeStatus {
        addresses: s
            .addresses
            .map(|a| a.into_iter().filter(|a| a.type_ == "InternalIP").collect()),
        conditions: s
            .conditions
            .map(|c| c.into_iter().filter(|c| c.type_ == "Ready").collect()),
        ..NodeStatus::default()
    });
}

/// Starts the agent's two watchers with their stores; their messages arrive on the returned
/// channel.
pub fn spawn_watchers(client: Client) -> (Stores, mpsc::Receiver<Msg>) {
    let mut w = Watchers::new();
    let stores = Stores {
        nodes: w.watch(Api::all(client.clone()), Resource::Node, slim_node),
        // Pods are slim from the start: `WatchedPod` deserializes only what st8s reads.
        pods: w.watch(Api::all(client), Resource::Pod, name_only_without_host_ports),
    };
    (stores, w.start())
}

type ListProbe = Box<dyn Fn() -> futures::future::BoxFuture<'static, bool> + Send + Sync>;

/// Watchers, each keeping a reflector store of one kind and reporting on one channel, with a
/// prober that lists a failing kind (one object) every few seconds to notice when it can be read
/// again: a quiet kind sends no event when its watch comes back.
pub struct Watchers {
    tx: mpsc::Sender<Msg>,
    rx: mpsc::Receiver<Msg>,
    probes: Vec<(Resource, Arc<AtomicBool>, ListProbe)>,
}

impl Watchers {
    #[expect(
        clippy::new_without_default,
        reason = "it makes a channel; not a value to default to"
    )]
    pub fn new() -> Self {
        let (tx, rx) = mpsc::channel(1024);
        Watchers {
            tx,
            rx,
            probes: Vec::new(),
        }
    }

    /// Starts watching `api` into a store, each object passed through `slim` before it is
    /// stored.
    pub fn watch<K>(
        &mut self,
        api: Api<K>,
        kind: Resource,
        slim: impl FnMut(&mut K) + Send + 'static,
    ) -> Store<K>
    where
        K: kube::Resource<DynamicType = ()>
            + Clone
            + serde::de::DeserializeOwned
            + fmt::Debug
            + Send
            + Sync
            + 'static,
    {
        let (store, writer) = reflector::store();
        let failing = Arc::new(AtomicBool::new(false));
        let probe_api = api.clone();
        self.probes.push((
            kind,
            failing.clone(),
            Box::new(move || {
                let api = probe_api.clone();
                Box::pin(async move { api.list_metadata(&ListParams::default().limit(1)).await.is_ok() })
            }),
        ));
        let tx = self.tx.clone();
        tokio::spawn(async move {
            let mut s = watcher::watcher(api, watcher::Config::default())
                .default_backoff()
                .modify(slim)
                .reflect(writer)
                .boxed();
            while let Some(item) = s.next().await {
                let msg = match item {
                    Ok(ev) => {
                        failing.store(false, Ordering::Relaxed);
                        progress(kind, &ev)
                    }
                    Err(e) => {
                        let failure = WatchFailure::of(&e);
                        // A relist after 410 is routine, and a kind the API does not serve
                        // comes back through the watcher's own retries once its CRD is
                        // installed.
                        if !matches!(failure, WatchFailure::Gone | WatchFailure::NotServed) {
                            failing.store(true, Ordering::Relaxed);
                        }
                        Msg::Failed {
                            kind,
                            failure,
                            message: e.to_string(),
                        }
                    }
                };
                if tx.send(msg).await.is_err() {
                    return;
                }
            }
        });
        store
    }

    /// Starts the recovery prober; every message arrives on the returned channel.
    pub fn start(self) -> mpsc::Receiver<Msg> {
        let Watchers { tx, rx, probes } = self;
        tokio::spawn(async move {
            loop {
                tokio::time::sleep(Duration::from_secs(2)).await;
                for (kind, failing, list) in &probes {
                    if failing.load(Ordering::Relaxed) && list().await {
                        failing.store(false, Ordering::Relaxed);
                        if tx.send(Msg::Reachable(*kind)).await.is_err() {
                            return;
                        }
                    }
                }
            }
        });
        rx
    }
}

/// The message for an event the store has taken in. A list changes the store only once it is
/// complete.
pub fn progress<K>(kind: Resource, ev: &Event<K>) -> Msg {
    let (changed, listed) = match ev {
        Event::Apply(_) | Event::Delete(_) => (true, false),
        Event::InitDone => (true, true),
        Event::Init | Event::InitApply(_) => (false, false),
    };
    Msg::Event {
        kind,
        at: Instant::now(),
        changed,
        listed,
    }
}

/// When the message's event arrived, for the event-to-map latency.
pub fn arrived(msg: &Msg) -> Option<Instant> {
    match msg {
        Msg::Event {
            at, changed: true, ..
        } => Some(*at),
        Msg::Event { .. } => None,
        Msg::Failed { .. } | Msg::Reachable(_) => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::core::HostPort;

    fn node(name: &str, ip: &str) -> Node {
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "managedFields": [{"manager": "kubelet"}]},
            "status": {"addresses": [{"type": "InternalIP", "address": ip}, {"type": "Hostname", "address": name}],
                       "conditions": [{"type": "Ready", "status": "True"}, {"type": "MemoryPressure", "status": "False"}]}
        }))
        .expect("node")
    }

    fn pod(name: &str, host_port: Option<i32>) -> WatchedPod {
        let mut port = serde_json::json!({"containerPort": 8080});
        if let Some(h) = host_port {
            port["hostPort"] = h.into();
        }
        serde_json::from_value(serde_json::json!({
            "metadata": {"name": name, "namespace": "ns", "annotations": {"st8s.io/steer": "true", "other": "x"}},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "image": "img", "ports": [port]}]},
            "status": {"podIP": "10.244.1.2", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod")
    }

    /// The state over stores that the test writes as the watchers would.
    struct Harness {
        state: KubeState,
        nodes: reflector::store::Writer<Node>,
        pods: reflector::store::Writer<WatchedPod>,
    }

    impl Harness {
        fn new() -> Self {
            let (nodes, node_writer) = reflector::store();
            let (pods, pod_writer) = reflector::store();
            Harness {
                state: KubeState::new(Stores { nodes, pods }),
                nodes: node_writer,
                pods: pod_writer,
            }
        }

        fn node(&mut self, mut ev: Event<Node>) -> Effect {
            match &mut ev {
                Event::Apply(n) | Event::Delete(n) | Event::InitApply(n) => slim_node(n),
                Event::Init | Event::InitDone => {}
            }
            self.nodes.apply_watcher_event(&ev);
            self.state.handle(progress(Resource::Node, &ev))
        }

        fn pod(&mut self, mut ev: Event<WatchedPod>) -> Effect {
            match &mut ev {
                Event::Apply(p) | Event::Delete(p) | Event::InitApply(p) => name_only_without_host_ports(p),
                Event::Init | Event::InitDone => {}
            }
            self.pods.apply_watcher_event(&ev);
            self.state.handle(progress(Resource::Pod, &ev))
        }
    }

    #[test]
    fn what_the_plan_reads_is_kept() {
        let n = k8s::node(&node("n1", "10.0.0.1"));
        assert_eq!(n.addr, Some("10.0.0.1".parse().expect("ip")));
        assert!(n.ready);
        let p = pod("web", Some(80)).to_pod().expect("has a hostPort");
        assert_eq!(p.key(), "ns/web");
        assert_eq!(p.steer.as_deref(), Some("true"));
        assert_eq!(p.host_ports, [HostPort::new(80, 8080, "TCP")]);
        assert!(p.ready);
        assert!(
            pod("plain", None).to_pod().is_none(),
            "pods without hostPorts are not kept"
        );
        assert!(!p.terminating);
        let deleted: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns", "deletionTimestamp": "2026-11-25T10:00:00Z"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 8080, "hostPort": 80}]}]},
            "status": {"podIP": "10.244.1.2", "conditions": [{"type": "Ready", "status": "True"}]}
        }))
        .expect("pod");
        let d = deleted.to_pod().expect("has a hostPort");
        assert!(
            d.ready && d.terminating,
            "a rolling update deletes pods that are still Ready"
        );
        // Dual stack: podIPs lists both families, the primary first.
        let dual: WatchedPod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "web", "namespace": "ns"},
            "spec": {"nodeName": "n1", "containers": [{"name": "c", "ports": [{"containerPort": 8080, "hostPort": 80}]}]},
            "status": {"podIP": "fd00:244:1::2", "podIPs": [{"ip": "fd00:244:1::2"}, {"ip": "10.244.1.2"}]}
        }))
        .expect("pod");
        assert_eq!(
            dual.to_pod().expect("has a hostPort").ips,
            ["fd00:244:1::2", "10.244.1.2"]
        );
        let mut n6 = node("n6", "10.0.0.6");
        if let Some(a) = n6.status.as_mut().and_then(|s| s.addresses.as_mut()) {
            a.push(k8s_openapi::api::core::v1::NodeAddress {
                type_: "InternalIP".into(),
                address: "fd00:77::6".into(),
            });
        }
        let n6 = k8s::node(&n6);
        assert_eq!(
            (n6.addr, n6.addr6),
            (
                Some("10.0.0.6".parse().expect("ip")),
                Some("fd00:77::6".parse().expect("ip"))
            )
        );
        let mut plain = pod("plain", None);
        name_only_without_host_ports(&mut plain);
        assert!(plain.spec.is_none() && plain.status.is_none() && plain.metadata.annotations.is_none());
        assert_eq!(plain.key(), "ns/plain", "the store keeps its name");
        let mut web = pod("web", Some(80));
        name_only_without_host_ports(&mut web);
        assert!(
            web.to_pod().is_some(),
            "a pod with a hostPort keeps what the plan reads"
        );
    }

    #[test]
    fn slim_nodes_keep_what_the_plan_reads() {
        let mut n = node("n1", "10.0.0.1");
        slim_node(&mut n);
        assert!(n.metadata.managed_fields.is_none());
        let status = n.status.as_ref().expect("status");
        assert_eq!(
            status.addresses.as_ref().map(Vec::len),
            Some(1),
            "InternalIP only"
        );
        assert_eq!(status.conditions.as_ref().map(Vec::len), Some(1), "Ready only");
        let c = k8s::node(&n);
        assert_eq!(
            (c.name.as_str(), c.addr, c.ready),
            ("n1", Some("10.0.0.1".parse().expect("ip")), true)
        );
    }

    #[test]
    fn relist_replaces_the_kind_and_drops_vanished_objects() {
        let mut h = Harness::new();
        for ev in [
            Event::Init,
            Event::InitApply(node("a", "10.0.0.1")),
            Event::InitApply(node("b", "10.0.0.2")),
            Event::InitDone,
        ] {
            h.node(ev);
        }
        assert!(!h.state.synced(), "pods not listed yet");
        let e = h.pod(Event::Init);
        assert!(!e.changed);
        h.pod(Event::InitApply(pod("web", Some(80))));
        assert!(h.pod(Event::InitDone).changed);
        assert!(h.state.synced() && h.state.healthy());
        assert_eq!(h.state.cluster.nodes.len(), 2);
        assert_eq!(h.state.cluster.pods.len(), 1);
        // "b" was deleted while the watch was down: the relist drops it.
        for ev in [Event::Init, Event::InitApply(node("a", "10.0.0.1"))] {
            h.node(ev);
        }
        assert_eq!(
            h.state.cluster.nodes.len(),
            2,
            "the old view holds until the relist completes"
        );
        assert!(h.node(Event::InitDone).changed);
        assert_eq!(h.state.cluster.nodes.keys().collect::<Vec<_>>(), ["a"]);
        // Incremental events.
        assert!(h.pod(Event::Delete(pod("web", Some(80)))).changed);
        assert!(!h.pod(Event::Apply(pod("plain", None))).changed, "irrelevant pod");
        assert!(h.state.cluster.pods.is_empty());
    }

    #[test]
    fn failures_are_reported_once_per_kind_and_recovery_clears_them() {
        let mut h = Harness::new();
        for ev in [Event::Init, Event::InitDone] {
            h.node(ev);
        }
        for ev in [Event::Init, Event::InitDone] {
            h.pod(ev);
        }
        let s = &mut h.state;
        assert!(s.healthy());
        let fail = || Msg::Failed {
            kind: Resource::Pod,
            failure: WatchFailure::Unreachable,
            message: "refused".into(),
        };
        assert_eq!(
            s.handle(fail()).new_failure,
            Some((Resource::Pod, WatchFailure::Unreachable))
        );
        assert_eq!(
            s.handle(fail()).new_failure,
            None,
            "the same failure again is not news"
        );
        assert!(!s.healthy());
        let e = h.pod(Event::Init);
        assert_eq!(e.recovered, Some(Resource::Pod));
        assert!(h.state.healthy());
    }

    #[test]
    fn an_optional_kind_that_is_not_served_counts_as_listed_and_empty() {
        let kinds = [Resource::Node, Resource::IngressRoute];
        let mut s = WatchStatus::default();
        let listed = |kind| Msg::Event {
            kind,
            at: Instant::now(),
            changed: true,
            listed: true,
        };
        let not_served = |kind| Msg::Failed {
            kind,
            failure: WatchFailure::NotServed,
            message: "404".into(),
        };
        assert!(s.take(&listed(Resource::Node)).first_list);
        assert!(!s.synced(&kinds));
        let e = s.take(&not_served(Resource::IngressRoute));
        assert_eq!(
            (e.absent, e.changed, e.new_failure),
            (Some(Resource::IngressRoute), true, None)
        );
        assert!(s.synced(&kinds) && s.absent(Resource::IngressRoute));
        assert_eq!(s.failing().count(), 0, "an absent CRD is not a failure");
        assert_eq!(
            s.take(&not_served(Resource::IngressRoute)),
            Effect::default(),
            "said once"
        );
        // The CRD is installed: the kind is read again.
        let e = s.take(&listed(Resource::IngressRoute));
        assert!(e.changed && e.first_list && !s.absent(Resource::IngressRoute));
        // A required kind that is not served is a failure.
        let e = s.take(&not_served(Resource::Node));
        assert_eq!(e.new_failure, Some((Resource::Node, WatchFailure::NotServed)));
    }
}
