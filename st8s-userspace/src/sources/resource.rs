//! The Kubernetes resources st8s reads or writes, named once: the agent's watchers, `st8s dns`'s
//! watchers and the API-server double of the tests all use [`Resource`].

use std::fmt;

use kube::{api::ApiResource, core::GroupVersionKind};

#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash)]
pub enum Resource {
    Node,
    Pod,
    Service,
    ConfigMap,
    Lease,
    Ingress,
    HttpRoute,
    IngressRoute,
}

impl Resource {
    pub const ALL: [Resource; 8] = [
        Resource::Node,
        Resource::Pod,
        Resource::Service,
        Resource::ConfigMap,
        Resource::Lease,
        Resource::Ingress,
        Resource::HttpRoute,
        Resource::IngressRoute,
    ];

    /// (group, version, kind, plural); the core group is "".
    pub const fn gvkp(self) -> (&'static str, &'static str, &'static str, &'static str) {
        match self {
            Resource::Node => ("", "v1", "Node", "nodes"),
            Resource::Pod => ("", "v1", "Pod", "pods"),
            Resource::Service => ("", "v1", "Service", "services"),
            Resource::ConfigMap => ("", "v1", "ConfigMap", "configmaps"),
            Resource::Lease => ("coordination.k8s.io", "v1", "Lease", "leases"),
            Resource::Ingress => ("networking.k8s.io", "v1", "Ingress", "ingresses"),
            Resource::HttpRoute => ("gateway.networking.k8s.io", "v1", "HTTPRoute", "httproutes"),
            Resource::IngressRoute => ("traefik.io", "v1alpha1", "IngressRoute", "ingressroutes"),
        }
    }

    pub const fn group(self) -> &'static str {
        self.gvkp().0
    }

    pub const fn kind(self) -> &'static str {
        self.gvkp().2
    }

    pub const fn plural(self) -> &'static str {
        self.gvkp().3
    }

    /// `v1`, or `group/version`.
    pub fn api_version(self) -> String {
        match self.gvkp() {
            ("", v, ..) => v.to_owned(),
            (g, v, ..) => format!("{g}/{v}"),
        }
    }

    /// Where the API serves it: `/api/v1`, or `/apis/group/version`.
    pub fn path_prefix(self) -> String {
        match self.gvkp() {
            ("", v, ..) => format!("/api/{v}"),
            (g, v, ..) => format!("/apis/{g}/{v}"),
        }
    }

    pub fn api_resource(self) -> ApiResource {
        let (g, v, k, p) = self.gvkp();
        ApiResource::from_gvk_with_plural(&GroupVersionKind::gvk(g, v, k), p)
    }

    /// Custom resources: a cluster without their CRD simply has none of them.
    pub const fn optional(self) -> bool {
        matches!(self, Resource::HttpRoute | Resource::IngressRoute)
    }
}

/// Implements kube's `Resource` for a slim type that deserializes only the part of a kind's
/// objects that st8s reads (as `WatchedPod` does for Pods), so that watchers and reflector stores
/// take it like a k8s-openapi type.
macro_rules! slim_resource {
    ($ty:ty, $resource:expr, $scope:ty) => {
        impl kube::Resource for $ty {
            type DynamicType = ();
            type Scope = $scope;

            fn kind(_: &()) -> std::borrow::Cow<'_, str> {
                $resource.kind().into()
            }
            fn group(_: &()) -> std::borrow::Cow<'_, str> {
                $resource.group().into()
            }
            fn version(_: &()) -> std::borrow::Cow<'_, str> {
                $resource.gvkp().1.into()
            }
            fn plural(_: &()) -> std::borrow::Cow<'_, str> {
                $resource.plural().into()
            }
            fn meta(&self) -> &k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &self.metadata
            }
            fn meta_mut(&mut self) -> &mut k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta {
                &mut self.metadata
            }
        }
    };
}
pub(crate) use slim_resource;

/// The plural, as `kubectl` and the API paths spell it.
impl fmt::Display for Resource {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.plural())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn paths_and_versions_follow_the_group() {
        assert_eq!(Resource::Pod.path_prefix(), "/api/v1");
        assert_eq!(Resource::Pod.api_version(), "v1");
        assert_eq!(Resource::Lease.path_prefix(), "/apis/coordination.k8s.io/v1");
        assert_eq!(Resource::IngressRoute.api_version(), "traefik.io/v1alpha1");
        assert_eq!(Resource::HttpRoute.api_resource().plural, "httproutes");
        assert_eq!(Resource::Node.to_string(), "nodes");
    }
}
