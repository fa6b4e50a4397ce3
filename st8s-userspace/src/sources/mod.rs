//! Where the agent's inputs come from, each turned into the core's types: the Kubernetes API
//! ([`kube`], watchers), a YAML file ([`file`]), and the other nodes' health ([`probe`]). They
//! may call the core; nothing here touches the kernel.

pub mod file;
pub mod k8s;
pub mod kube;
pub mod probe;
pub mod resource;
