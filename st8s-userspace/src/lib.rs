//! The st8s agent as a library: the pure core ([`model`], [`plan`], [`maglev`]) and the adapters
//! around it ([`dataplane`], [`source`], [`net`], [`inspect`]).

pub mod agent;
pub mod dataplane;
pub mod dns;
pub mod http;
pub mod inspect;
pub mod kube_source;
pub mod maglev;
pub mod model;
pub mod net;
pub mod packet;
pub mod pins;
pub mod plan;
pub mod source;
