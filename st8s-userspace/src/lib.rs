//! The st8s agent as a library, one folder per layer:
//!
//! - [`core`]: cluster in, tables out; pure (no kernel, runtime or API server);
//! - [`dataplane`]: loads, attaches and pins the kernel programs, and the one writer of their maps;
//! - [`sources`]: the Kubernetes API, a YAML file and peer probes, turned into the core's input;
//! - [`agent`]: the loop that joins them (`st8s agent`);
//! - [`dns`]: LAN names for CoreDNS (`st8s dns`);
//! - [`http`]: health and metrics endpoints.
//!
//! Without the default `agent` feature only [`core`] is built: it needs neither aya, tokio nor kube.

pub mod core;

#[cfg(feature = "agent")]
pub mod agent;
#[cfg(feature = "agent")]
pub mod dataplane;
#[cfg(feature = "agent")]
pub mod dns;
#[cfg(feature = "agent")]
pub mod fuzzing;
#[cfg(feature = "agent")]
pub mod http;
#[cfg(feature = "agent")]
pub mod packet;
#[cfg(feature = "agent")]
pub mod sources;

/// The field manager of every server-side apply st8s makes (agent Leases, the zones ConfigMap).
pub const FIELD_MANAGER: &str = "st8s";
