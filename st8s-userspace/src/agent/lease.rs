//! The agent's Lease (`st8s-agent-<node>`), renewed while the agent is ready: `st8s dns` keeps a
//! node in its answers only while its Lease is fresh.

use std::{
    sync::Arc,
    time::{Duration, Instant},
};

use k8s_openapi::{
    api::coordination::v1::{Lease, LeaseSpec},
    apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta},
    jiff::Timestamp,
};
use tracing::{info, warn};

use super::AgentArgs;
use crate::http::{ErrorKind, Metrics};

/// Renews `st8s-agent-<node>` while the agent is ready, so that `st8s dns` keeps this node in its
/// answers; when the agent stops or turns unready, the Lease runs out and the node leaves them.
///
/// With `heard` (`--mdns`), the Lease also carries the `.local` hosts this node hears, as JSON in
/// the annotation `st8s.io/mdns-hosts`, renewed at once when they change.
pub fn spawn_renewer(
    client: kube::Client,
    args: &AgentArgs,
    metrics: Arc<Metrics>,
    heard: Option<tokio::sync::watch::Receiver<super::mdns::Heard>>,
) {
    let leases: kube::Api<Lease> = kube::Api::namespaced(client, &args.lease_namespace);
    let name = format!("{}{}", crate::dns::LEASE_PREFIX, args.node);
    let node = args.node.clone();
    let secs = args.lease_seconds;
    let every = Duration::from_millis(u64::from(secs) * 1000 / 3);
    tokio::spawn(async move {
        let mut failing = false;
        let mut renewed: Option<Instant> = None;
        let mut published: Option<String> = None;
        loop {
            let hosts = heard
                .as_ref()
                .map(|h| serde_json::to_string(&*h.borrow()).unwrap_or_default());
            // Renewed as soon as the agent turns ready, then every third of the duration, and
            // when the hosts heard change.
            let due = renewed.is_none_or(|t| t.elapsed() >= every) || hosts != published;
            if metrics.is_ready() && due {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(name.clone()),
                        labels: Some([("app.kubernetes.io/name".to_owned(), "st8s".to_owned())].into()),
                        annotations: hosts
                            .clone()
                            .map(|h| [(crate::dns::mdns::HOSTS_ANNOTATION.to_owned(), h)].into()),
                        ..ObjectMeta::default()
                    },
                    spec: Some(LeaseSpec {
                        holder_identity: Some(node.clone()),
                        lease_duration_seconds: Some(secs as i32),
                        renew_time: Some(MicroTime(Timestamp::now())),
                        ..LeaseSpec::default()
                    }),
                };
                let params = kube::api::PatchParams::apply(crate::FIELD_MANAGER).force();
                let result = leases
                    .patch(&name, &params, &kube::api::Patch::Apply(&lease))
                    .await;
                renewed = Some(Instant::now());
                if result.is_ok() {
                    published = hosts;
                }
                match result {
                    Ok(_) if failing => {
                        info!(lease = %name, "lease renewed again");
                        failing = false;
                    }
                    Ok(_) => {}
                    Err(e) => {
                        metrics.error(ErrorKind::Lease);
                        if !failing {
                            warn!(lease = %name, error = %e, "cannot renew the lease; st8s dns will drop this node when it runs out");
                            failing = true;
                        }
                    }
                }
            }
            tokio::time::sleep(every.min(Duration::from_millis(250))).await;
        }
    });
}
