//! The Kubernetes source: Nodes and Pods through kube-rs watchers.
//!
//! Two watcher tasks forward their events, stamped with the time they arrived, to the agent.
//! [`KubeState`] folds them into the same [`Cluster`] the file source produces; it is pure and
//! tested without an API server. A (re)list replaces that kind's objects as a whole once it is
//! complete, so that objects deleted while the watch was down disappear too.

use std::{
    collections::BTreeMap,
    fmt,
    sync::{
        Arc,
        atomic::{AtomicBool, Ordering},
    },
    time::{Duration, Instant},
};

use futures::StreamExt as _;
use k8s_openapi::{api::core::v1::Node, apimachinery::pkg::apis::meta::v1::ObjectMeta};
use kube::{
    Api, Client,
    api::ListParams,
    runtime::{
        WatchStreamExt as _,
        watcher::{self, Event},
    },
};
use tokio::sync::mpsc;

use super::{k8s, resource::Resource};
use crate::core::{self, Cluster};

/// One message from a watcher task.
#[derive(Debug)]
pub enum Msg {
    Node(Box<Event<Node>>, Instant),
    Pod(Box<Event<WatchedPod>>, Instant),
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
    #[serde(deserialize_with = "slim_meta")]
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
    #[serde(default)]
    pub conditions: Vec<WatchedCondition>,
}

#[derive(Clone, Debug, Default, serde::Deserialize)]
pub struct WatchedCondition {
    #[serde(rename = "type")]
    pub type_: String,
    pub status: String,
}

#[derive(serde::Deserialize)]
#[serde(rename_all = "camelCase")]
struct SlimMeta {
    #[serde(default)]
    name: Option<String>,
    #[serde(default)]
    namespace: Option<String>,
    #[serde(default)]
    annotations: Option<BTreeMap<String, String>>,
    #[serde(default)]
    resource_version: Option<String>,
}

/// Metadata without managedFields, labels and the rest: name, namespace, resourceVersion, and
/// the `st8s.io/` annotations.
fn slim_meta<'de, D: serde::Deserializer<'de>>(d: D) -> Result<ObjectMeta, D::Error> {
    let m = <SlimMeta as serde::Deserialize>::deserialize(d)?;
    Ok(ObjectMeta {
        name: m.name,
        namespace: m.namespace,
        resource_version: m.resource_version,
        annotations: m
            .annotations
            .map(|a| a.into_iter().filter(|(k, _)| k.starts_with("st8s.io/")).collect())
            .filter(|a: &BTreeMap<String, String>| !a.is_empty()),
        ..Default::default()
    })
}

impl kube::Resource for WatchedPod {
    type DynamicType = ();
    type Scope = k8s_openapi::NamespaceResourceScope;

    fn kind(_: &()) -> std::borrow::Cow<'_, str> {
        "Pod".into()
    }
    fn group(_: &()) -> std::borrow::Cow<'_, str> {
        "".into()
    }
    fn version(_: &()) -> std::borrow::Cow<'_, str> {
        "v1".into()
    }
    fn plural(_: &()) -> std::borrow::Cow<'_, str> {
        "pods".into()
    }
    fn meta(&self) -> &ObjectMeta {
        &self.metadata
    }
    fn meta_mut(&mut self) -> &mut ObjectMeta {
        &mut self.metadata
    }
}

impl WatchedPod {
    /// `namespace/name`.
    pub fn key(&self) -> String {
        format!(
            "{}/{}",
            self.metadata.namespace.as_deref().unwrap_or("default"),
            self.metadata.name.as_deref().unwrap_or("<unnamed>")
        )
    }

    /// The pod as the core reads it, or nothing when it declares no hostPort (such a pod can
    /// never matter: a pod's ports are immutable).
    pub fn into_pod(self) -> Option<core::Pod> {
        let spec = self.spec?;
        let status = self.status.unwrap_or_default();
        k8s::core_pod(k8s::PodParts {
            namespace: self.metadata.namespace,
            name: self.metadata.name,
            annotations: self.metadata.annotations.as_ref(),
            node: spec.node_name,
            ip: status.pod_ip,
            ready: status
                .conditions
                .iter()
                .any(|c| c.type_ == "Ready" && c.status == "True"),
            host_network: spec.host_network.unwrap_or(false),
            ports: spec
                .containers
                .iter()
                .flat_map(|c| &c.ports)
                .map(|p| (p.host_port, p.container_port, p.protocol.as_deref())),
        })
    }
}

/// The cluster as the watchers have reported it so far.
#[derive(Debug, Default)]
pub struct KubeState {
    pub cluster: Cluster,
    relisting_nodes: Option<BTreeMap<String, core::Node>>,
    relisting_pods: Option<BTreeMap<String, core::Pod>>,
    listed_nodes: bool,
    listed_pods: bool,
    failing: BTreeMap<Resource, WatchFailure>,
}

/// What one message changed.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Effect {
    /// The cluster changed (a re-plan is due).
    pub changed: bool,
    /// The watcher of this kind failed with a new kind of error (worth one log line).
    pub new_failure: Option<(Resource, WatchFailure)>,
    /// This kind's watcher recovered from a failure.
    pub recovered: Option<Resource>,
}

impl KubeState {
    /// Both watchers have completed a list at least once.
    pub fn synced(&self) -> bool {
        self.listed_nodes && self.listed_pods
    }

    /// Synced, and no watcher is failing right now.
    pub fn healthy(&self) -> bool {
        self.synced() && self.failing.is_empty()
    }

    pub fn failing(&self) -> impl Iterator<Item = (Resource, WatchFailure)> + '_ {
        self.failing.iter().map(|(k, f)| (*k, *f))
    }

    pub fn handle(&mut self, msg: Msg) -> Effect {
        let mut effect = Effect::default();
        let kind = match &msg {
            Msg::Node(..) => Resource::Node,
            Msg::Pod(..) => Resource::Pod,
            Msg::Reachable(kind) => {
                if self.failing.remove(kind).is_some() {
                    effect.recovered = Some(*kind);
                }
                return effect;
            }
            Msg::Failed { kind, failure, .. } => {
                if self.failing.insert(*kind, *failure) != Some(*failure) {
                    effect.new_failure = Some((*kind, *failure));
                }
                return effect;
            }
        };
        if self.failing.remove(&kind).is_some() {
            effect.recovered = Some(kind);
        }
        match msg {
            Msg::Node(ev, _) => match *ev {
                Event::Apply(n) => {
                    self.cluster.upsert_node(k8s::node(&n));
                    effect.changed = true;
                }
                Event::Delete(n) => {
                    self.cluster
                        .remove_node(n.metadata.name.as_deref().unwrap_or_default());
                    effect.changed = true;
                }
                Event::Init => self.relisting_nodes = Some(BTreeMap::new()),
                Event::InitApply(n) => {
                    let n = k8s::node(&n);
                    self.relisting_nodes
                        .get_or_insert_default()
                        .insert(n.name.clone(), n);
                }
                Event::InitDone => {
                    let fresh = self.relisting_nodes.take().unwrap_or_default();
                    effect.changed = fresh != self.cluster.nodes || !self.listed_nodes;
                    self.cluster.nodes = fresh;
                    self.listed_nodes = true;
                }
            },
            Msg::Pod(ev, _) => match *ev {
                Event::Apply(p) => {
                    let key = p.key();
                    match p.into_pod() {
                        Some(p) => {
                            self.cluster.upsert_pod(p);
                            effect.changed = true;
                        }
                        None => effect.changed = self.cluster.remove_pod(&key),
                    }
                }
                Event::Delete(p) => {
                    effect.changed = self.cluster.remove_pod(&p.key());
                }
                Event::Init => self.relisting_pods = Some(BTreeMap::new()),
                Event::InitApply(p) => {
                    if let Some(p) = p.into_pod() {
                        self.relisting_pods.get_or_insert_default().insert(p.key(), p);
                    }
                }
                Event::InitDone => {
                    let fresh = self.relisting_pods.take().unwrap_or_default();
                    effect.changed = fresh != self.cluster.pods || !self.listed_pods;
                    self.cluster.pods = fresh;
                    self.listed_pods = true;
                }
            },
            Msg::Failed { .. } | Msg::Reachable(_) => {}
        }
        effect
    }
}

/// Starts the two watchers, and a prober that lists a failing kind (one object) every few
/// seconds to notice when it can be read again; their messages arrive on the returned channel.
pub fn spawn_watchers(client: Client) -> mpsc::Receiver<Msg> {
    let (tx, rx) = mpsc::channel(1024);
    let failing: Arc<[AtomicBool; 2]> = Arc::new([AtomicBool::new(false), AtomicBool::new(false)]);
    spawn_watcher::<Node>(
        Api::all(client.clone()),
        Resource::Node,
        Msg::Node,
        tx.clone(),
        failing.clone(),
    );
    spawn_watcher::<WatchedPod>(
        Api::all(client.clone()),
        Resource::Pod,
        Msg::Pod,
        tx.clone(),
        failing.clone(),
    );
    tokio::spawn(async move {
        let nodes: Api<Node> = Api::all(client.clone());
        let pods: Api<WatchedPod> = Api::all(client);
        let one = ListParams::default().limit(1);
        loop {
            tokio::time::sleep(Duration::from_secs(2)).await;
            for (i, kind) in [Resource::Node, Resource::Pod].into_iter().enumerate() {
                if !failing[i].load(Ordering::Relaxed) {
                    continue;
                }
                let ok = if kind == Resource::Node {
                    nodes.list_metadata(&one).await.is_ok()
                } else {
                    pods.list_metadata(&one).await.is_ok()
                };
                if ok {
                    failing[i].store(false, Ordering::Relaxed);
                    if tx.send(Msg::Reachable(kind)).await.is_err() {
                        return;
                    }
                }
            }
        }
    });
    rx
}

fn spawn_watcher<K>(
    api: Api<K>,
    kind: Resource,
    wrap: fn(Box<Event<K>>, Instant) -> Msg,
    tx: mpsc::Sender<Msg>,
    failing: Arc<[AtomicBool; 2]>,
) where
    K: kube::Resource + Clone + serde::de::DeserializeOwned + fmt::Debug + Send + 'static,
{
    // The index into `failing`: nodes, then pods.
    let i = usize::from(kind != Resource::Node);
    tokio::spawn(async move {
        let mut s = watcher::watcher(api, watcher::Config::default())
            .default_backoff()
            .boxed();
        while let Some(item) = s.next().await {
            let msg = match item {
                Ok(ev) => {
                    failing[i].store(false, Ordering::Relaxed);
                    wrap(Box::new(ev), Instant::now())
                }
                Err(e) => {
                    let failure = WatchFailure::of(&e);
                    if failure != WatchFailure::Gone {
                        failing[i].store(true, Ordering::Relaxed);
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
}

/// When the message's event arrived, for the event-to-map latency.
pub fn arrived(msg: &Msg) -> Option<Instant> {
    match msg {
        Msg::Node(_, t) | Msg::Pod(_, t) => Some(*t),
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

    fn t() -> Instant {
        Instant::now()
    }

    #[test]
    fn what_the_plan_reads_is_kept() {
        let n = k8s::node(&node("n1", "10.0.0.1"));
        assert_eq!(n.addr, Some("10.0.0.1".parse().expect("ip")));
        assert!(n.ready);
        let p = pod("web", Some(80)).into_pod().expect("has a hostPort");
        assert_eq!(p.key(), "ns/web");
        assert_eq!(p.steer.as_deref(), Some("true"));
        assert_eq!(p.host_ports, [HostPort::new(80, 8080, "TCP")]);
        assert!(p.ready);
        assert!(
            pod("plain", None).into_pod().is_none(),
            "pods without hostPorts are not kept"
        );
    }

    #[test]
    fn relist_replaces_the_kind_and_drops_vanished_objects() {
        let mut s = KubeState::default();
        for ev in [
            Event::Init,
            Event::InitApply(node("a", "10.0.0.1")),
            Event::InitApply(node("b", "10.0.0.2")),
            Event::InitDone,
        ] {
            s.handle(Msg::Node(Box::new(ev), t()));
        }
        assert!(!s.synced(), "pods not listed yet");
        let e = s.handle(Msg::Pod(Box::new(Event::Init), t()));
        assert!(!e.changed);
        s.handle(Msg::Pod(Box::new(Event::InitApply(pod("web", Some(80)))), t()));
        assert!(s.handle(Msg::Pod(Box::new(Event::InitDone), t())).changed);
        assert!(s.synced() && s.healthy());
        assert_eq!(s.cluster.nodes.len(), 2);
        assert_eq!(s.cluster.pods.len(), 1);
        // "b" was deleted while the watch was down: the relist drops it.
        for ev in [Event::Init, Event::InitApply(node("a", "10.0.0.1"))] {
            s.handle(Msg::Node(Box::new(ev), t()));
        }
        assert_eq!(
            s.cluster.nodes.len(),
            2,
            "the old view holds until the relist completes"
        );
        assert!(s.handle(Msg::Node(Box::new(Event::InitDone), t())).changed);
        assert_eq!(s.cluster.nodes.keys().collect::<Vec<_>>(), ["a"]);
        // Incremental events.
        assert!(
            s.handle(Msg::Pod(Box::new(Event::Delete(pod("web", Some(80)))), t()))
                .changed
        );
        assert!(
            !s.handle(Msg::Pod(Box::new(Event::Apply(pod("plain", None))), t()))
                .changed,
            "irrelevant pod"
        );
        assert!(s.cluster.pods.is_empty());
    }

    #[test]
    fn failures_are_reported_once_per_kind_and_recovery_clears_them() {
        let mut s = KubeState::default();
        for ev in [Event::Init, Event::InitDone] {
            s.handle(Msg::Node(Box::new(ev), t()));
        }
        for ev in [Event::Init, Event::InitDone] {
            s.handle(Msg::Pod(Box::new(ev), t()));
        }
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
        let e = s.handle(Msg::Pod(Box::new(Event::Init), t()));
        assert_eq!(e.recovered, Some(Resource::Pod));
        assert!(s.healthy());
    }
}
