//! What `st8s dns` reads of the cluster, typed: Nodes and the agents' Leases (k8s-openapi), and
//! the objects that name hostnames as slim types that deserialize only the fields the renderer
//! reads. The watchers store them and the offline reader parses YAML into the same types, so both
//! paths hand the renderer the same [`Objects`].

use k8s_openapi::{
    NamespaceResourceScope,
    api::{
        coordination::v1::Lease,
        core::v1::{Node, Pod},
    },
    apimachinery::pkg::apis::meta::v1::ObjectMeta,
};
use serde::Deserialize;

use super::{ANSWER_ANNOTATION, EXPOSURE_ANNOTATION, HOSTNAME_ANNOTATION, NamePort};
use crate::{
    core,
    sources::{
        k8s,
        kube::slim_node,
        resource::{Resource, slim_resource},
    },
};

/// Everything the zones are rendered from.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct Objects {
    pub nodes: Vec<Node>,
    pub leases: Vec<Lease>,
    pub routes: Vec<Route>,
    /// The pods that declare hostPorts (the backends st8s steers to), for `st8s.io/answer:
    /// backends`.
    pub pods: Vec<core::Pod>,
}

/// One object that names hostnames.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Route {
    /// `Kind namespace/name`, as warnings and the zone's comments name it.
    pub object: String,
    /// The `st8s.io/exposure` annotation, unparsed (a bad value is the renderer's warning).
    pub exposure: Option<String>,
    /// The `st8s.io/answer` annotation, unparsed.
    pub answer: Option<String>,
    pub hosts: Vec<String>,
    /// The ports a client of these names connects to on a node (`st8s.io/answer: backends`
    /// looks for nodes running a backend on one of them).
    pub ports: Vec<NamePort>,
}

/// HTTP and HTTPS: the ports of a name that an Ingress, HTTPRoute or IngressRoute routes (its
/// controller, Traefik or Envoy, holds them on the nodes).
pub const WEB_PORTS: [(i32, &str); 2] = [(80, "TCP"), (443, "TCP")];

/// A kind whose objects name hostnames.
pub trait NamesHosts: kube::Resource<DynamicType = ()> {
    /// The hostnames as the object spells them (validated by the renderer).
    fn hosts(&self) -> Vec<String>;

    /// The ports a client connects to under these names: HTTP and HTTPS unless the kind says
    /// otherwise.
    fn ports(&self) -> Vec<NamePort> {
        WEB_PORTS
            .iter()
            .map(|(p, proto)| (*p, (*proto).to_owned()))
            .collect()
    }

    fn route(&self) -> Route {
        let meta = self.meta();
        let kind = Self::kind(&());
        let name = meta.name.as_deref().unwrap_or("<unnamed>");
        Route {
            object: match &meta.namespace {
                Some(ns) => format!("{kind} {ns}/{name}"),
                None => format!("{kind} {name}"),
            },
            exposure: annotation(meta, EXPOSURE_ANNOTATION).map(str::to_owned),
            answer: annotation(meta, ANSWER_ANNOTATION).map(str::to_owned),
            hosts: self.hosts(),
            ports: self.ports(),
        }
    }
}

fn annotation<'a>(meta: &'a ObjectMeta, key: &str) -> Option<&'a str> {
    meta.annotations.as_ref()?.get(key).map(String::as_str)
}

/// `networking.k8s.io/v1` Ingress: `spec.rules[].host`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Ingress {
    #[serde(deserialize_with = "k8s::slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<IngressSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IngressSpec {
    #[serde(default)]
    pub rules: Option<Vec<IngressRule>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IngressRule {
    #[serde(default)]
    pub host: Option<String>,
}

slim_resource!(Ingress, Resource::Ingress, NamespaceResourceScope);

impl NamesHosts for Ingress {
    fn hosts(&self) -> Vec<String> {
        let rules = self.spec.iter().flat_map(|s| s.rules.iter().flatten());
        rules.filter_map(|r| r.host.clone()).collect()
    }
}

/// A Service annotated `st8s.io/hostname: "a.example.org,b.example.org"`; its names' ports are
/// its `spec.ports` (port and protocol), the ports its hostPort backends hold on the nodes.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct Service {
    #[serde(deserialize_with = "k8s::slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<ServiceSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServiceSpec {
    #[serde(default)]
    pub ports: Option<Vec<ServicePort>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct ServicePort {
    #[serde(default)]
    pub port: i32,
    #[serde(default)]
    pub protocol: Option<String>,
}

slim_resource!(Service, Resource::Service, NamespaceResourceScope);

impl NamesHosts for Service {
    fn hosts(&self) -> Vec<String> {
        let Some(a) = annotation(&self.metadata, HOSTNAME_ANNOTATION) else {
            return Vec::new();
        };
        a.split(',')
            .map(str::trim)
            .filter(|h| !h.is_empty())
            .map(str::to_owned)
            .collect()
    }

    fn ports(&self) -> Vec<NamePort> {
        let ports = self.spec.iter().flat_map(|s| s.ports.iter().flatten());
        ports
            .map(|p| {
                (
                    p.port,
                    p.protocol.as_deref().unwrap_or("TCP").to_ascii_uppercase(),
                )
            })
            .collect()
    }
}

/// Gateway API HTTPRoute: `spec.hostnames[]`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpRoute {
    #[serde(deserialize_with = "k8s::slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<HttpRouteSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct HttpRouteSpec {
    #[serde(default)]
    pub hostnames: Option<Vec<String>>,
}

slim_resource!(HttpRoute, Resource::HttpRoute, NamespaceResourceScope);

impl NamesHosts for HttpRoute {
    fn hosts(&self) -> Vec<String> {
        self.spec
            .iter()
            .flat_map(|s| s.hostnames.iter().flatten())
            .cloned()
            .collect()
    }
}

/// Traefik IngressRoute: ``Host(`a`, `b`)`` matchers in `spec.routes[].match`.
#[derive(Clone, Debug, Default, Deserialize)]
pub struct IngressRoute {
    #[serde(deserialize_with = "k8s::slim_meta")]
    pub metadata: ObjectMeta,
    #[serde(default)]
    pub spec: Option<IngressRouteSpec>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct IngressRouteSpec {
    #[serde(default)]
    pub routes: Option<Vec<TraefikRoute>>,
}

#[derive(Clone, Debug, Default, Deserialize)]
pub struct TraefikRoute {
    #[serde(default, rename = "match")]
    pub matcher: Option<String>,
}

slim_resource!(IngressRoute, Resource::IngressRoute, NamespaceResourceScope);

impl NamesHosts for IngressRoute {
    fn hosts(&self) -> Vec<String> {
        let routes = self.spec.iter().flat_map(|s| s.routes.iter().flatten());
        routes
            .filter_map(|r| r.matcher.as_deref())
            .flat_map(super::traefik_hosts)
            .collect()
    }
}

/// What `st8s dns` keeps of a Node: what the agent keeps, and the zone label.
pub fn slim_zone_node(zone_label: &str, n: &mut Node) {
    let zone = n
        .metadata
        .labels
        .as_mut()
        .and_then(|l| l.remove_entry(zone_label));
    slim_node(n);
    n.metadata.labels = zone.map(|z| [z].into());
}

/// What `st8s dns` keeps of a Lease: name, namespace, the agent's mDNS hosts and spec.
pub fn slim_lease(l: &mut Lease) {
    let hosts = l
        .metadata
        .annotations
        .as_mut()
        .and_then(|a| a.remove_entry(super::mdns::HOSTS_ANNOTATION));
    l.metadata = ObjectMeta {
        name: l.metadata.name.take(),
        namespace: l.metadata.namespace.take(),
        annotations: hosts.map(|h| [h].into()),
        resource_version: l.metadata.resource_version.take(),
        ..ObjectMeta::default()
    };
}

/// Objects from YAML documents (`kubectl get ... -o yaml`: lists, or several documents). Objects
/// of other kinds, and objects that do not parse as their kind, are left out.
pub fn from_yaml(text: &str) -> Result<Objects, serde_yaml::Error> {
    let mut values = Vec::new();
    for doc in serde_yaml::Deserializer::from_str(text) {
        flatten(serde_yaml::Value::deserialize(doc)?, &mut values);
    }
    let mut objects = Objects::default();
    for v in values {
        let kind = v.get("kind").and_then(|k| k.as_str()).unwrap_or("");
        let api = v.get("apiVersion").and_then(|k| k.as_str()).unwrap_or("");
        let found = match (kind, api) {
            ("Node", "v1") => {
                if let Ok(n) = serde_yaml::from_value(v) {
                    objects.nodes.push(n);
                }
                None
            }
            ("Lease", a) if a.starts_with("coordination.k8s.io/") => {
                if let Ok(l) = serde_yaml::from_value(v) {
                    objects.leases.push(l);
                }
                None
            }
            ("Pod", "v1") => {
                let pod = serde_yaml::from_value::<Pod>(v).ok();
                objects.pods.extend(pod.as_ref().and_then(k8s::pod));
                None
            }
            ("Ingress", _) => parsed::<Ingress>(v),
            ("Service", "v1") => parsed::<Service>(v),
            ("HTTPRoute", a) if a.starts_with("gateway.networking.k8s.io/") => parsed::<HttpRoute>(v),
            ("IngressRoute", a) if a.starts_with("traefik.") => parsed::<IngressRoute>(v),
            _ => None,
        };
        objects.routes.extend(found);
    }
    Ok(objects)
}

fn parsed<K: NamesHosts + serde::de::DeserializeOwned>(v: serde_yaml::Value) -> Option<Route> {
    serde_yaml::from_value::<K>(v).ok().map(|k| k.route())
}

fn flatten(v: serde_yaml::Value, out: &mut Vec<serde_yaml::Value>) {
    let is_list = v
        .get("kind")
        .and_then(|k| k.as_str())
        .is_some_and(|k| k.ends_with("List"));
    if is_list {
        if let Some(serde_yaml::Value::Sequence(items)) = v.get("items") {
            for i in items.clone() {
                flatten(i, out);
            }
        }
    } else if !v.is_null() {
        out.push(v);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_kind_names_its_hosts_and_the_zone_label_survives_slimming() {
        let objects = from_yaml(
            r#"
apiVersion: v1
kind: List
items:
- apiVersion: networking.k8s.io/v1
  kind: Ingress
  metadata: {name: a, namespace: x, annotations: {st8s.io/exposure: lan, other: y}, managedFields: [{}]}
  spec: {rules: [{host: a.example.org}, {http: {}}]}
- apiVersion: v1
  kind: Service
  metadata: {name: s, namespace: x, annotations: {st8s.io/hostname: " s.example.org, t.example.org"}}
  spec: {ports: [{port: 80}]}
- apiVersion: v1
  kind: Service
  metadata: {name: plain, namespace: x}
- apiVersion: gateway.networking.k8s.io/v1
  kind: HTTPRoute
  metadata: {name: h, namespace: x}
  spec: {hostnames: [h.example.org]}
- apiVersion: traefik.io/v1alpha1
  kind: IngressRoute
  metadata: {name: t, namespace: x}
  spec: {routes: [{match: "Host(`t.example.org`)"}, {}]}
- apiVersion: example.com/v1
  kind: HTTPRoute
  metadata: {name: other, namespace: x}
  spec: {hostnames: [o.example.org]}
"#,
        )
        .expect("parses");
        let routes: Vec<(&str, Option<&str>, Vec<&str>)> = objects
            .routes
            .iter()
            .map(|r| {
                (
                    r.object.as_str(),
                    r.exposure.as_deref(),
                    r.hosts.iter().map(String::as_str).collect(),
                )
            })
            .collect();
        assert_eq!(
            routes,
            [
                ("Ingress x/a", Some("lan"), vec!["a.example.org"]),
                ("Service x/s", None, vec!["s.example.org", "t.example.org"]),
                ("Service x/plain", None, vec![]),
                ("HTTPRoute x/h", None, vec!["h.example.org"]),
                ("IngressRoute x/t", None, vec!["t.example.org"]),
            ],
            "a foreign HTTPRoute is not read"
        );
        let ports = |i: usize| objects.routes[i].ports.clone();
        assert_eq!(ports(0), [(80, "TCP".into()), (443, "TCP".into())]);
        assert_eq!(ports(1), [(80, "TCP".into())], "a Service's own ports");

        let mut node: Node = serde_json::from_value(serde_json::json!({
            "metadata": {"name": "n1", "labels": {"st8s.io/zone": "attic", "kubernetes.io/os": "linux"}},
            "status": {"addresses": [{"type": "InternalIP", "address": "10.0.0.1"}]}
        }))
        .expect("node");
        slim_zone_node("st8s.io/zone", &mut node);
        assert_eq!(
            node.metadata.labels,
            Some([("st8s.io/zone".to_owned(), "attic".to_owned())].into())
        );
        assert_eq!(k8s::internal_ip(&node), Some("10.0.0.1".parse().expect("ip")));
    }
}
