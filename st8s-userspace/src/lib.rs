//! The st8s agent as a library: the pure core ([`model`], [`plan`], [`maglev`]) and the adapters
//! around it ([`dataplane`], [`source`], [`net`], [`inspect`]).

pub mod agent;
pub mod dataplane;
pub mod dns;
pub mod dns_watch;
pub mod fuzzing;
pub mod http;
pub mod inspect;
pub mod kube_source;
pub mod maglev;
pub mod model;
pub mod net;
pub mod packet;
pub mod pins;
pub mod plan;
pub mod probe;
pub mod source;

/// The field manager of every server-side apply st8s makes (agent Leases, the zones ConfigMap).
pub const FIELD_MANAGER: &str = "st8s";
