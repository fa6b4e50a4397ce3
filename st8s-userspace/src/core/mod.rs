//! The planning core: cluster in, the tables one node's dataplane should hold out.
//!
//! Owns the input types ([`cluster`]), the plan and its problems ([`plan`]), the settling of new
//! backends ([`settling`]), Maglev ([`maglev`]) and a port's map contents ([`tables`]). It calls
//! nothing outside itself but `st8s-common`'s map types: no kernel, no runtime, no API server.
//! `cargo test -p st8s-userspace --no-default-features` builds and tests it alone.

pub mod cluster;
pub mod maglev;
pub mod plan;
pub mod settling;
pub mod tables;

pub use cluster::{Cluster, HostPort, Node, Pod};
pub use plan::{
    BackendEntry, DISCOVERY_ANNOTATION, Desired, LocalBackend, NodeEntry, Plan, PlanError, PortId, PortPlan,
    Problem, Proto, STEER_ANNOTATION, keep_reachable, plan,
};
pub use settling::Settling;
pub use tables::{PortTables, port_tables};
