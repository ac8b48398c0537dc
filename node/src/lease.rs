//! The node heartbeat: the only writer of this node's Lease in `kube-node-lease`.
//!
//! Every `renew interval` (a quarter of the lease duration, 10 s by default) the Lease's
//! renewTime is set to now. The controller manager reads it to decide whether the node is alive.
//! The Lease is owned by the Node (ownerReference with the Node's UID, received from the node
//! status manager), so it is garbage-collected with the Node and recreated when the Node is.
//!
//! A renewal is given one renew interval to complete, as the kubelet bounds its heartbeat
//! client by `nodeStatusUpdateFrequency`: an API server whose etcd is away holds a request up to
//! its own 60 s timeout, and a heartbeat stuck that long would keep the node silent for most of
//! a minute after the control plane recovers (tests/tests/chaos_control_plane.rs).

use std::time::Duration;

use k8s_openapi::api::coordination::v1::{Lease, LeaseSpec};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{MicroTime, ObjectMeta, OwnerReference};
use k8s_openapi::chrono::Utc;
use kube::api::PostParams;
use kube::Api;
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backoff::Backoff;
use crate::node_status::NodeRef;

/// Namespace of node leases, fixed by Kubernetes.
pub const NODE_LEASE_NAMESPACE: &str = "kube-node-lease";

/// Errors renewing the Lease; all are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum LeaseError {
    #[error("renewing lease {NODE_LEASE_NAMESPACE}/{name}: {source}")]
    Api { name: String, source: kube::Error },
    #[error("renewing lease {NODE_LEASE_NAMESPACE}/{name}: no answer within {after:?}")]
    TimedOut { name: String, after: Duration },
}

/// Owns the node's Lease.
pub struct LeaseHeartbeat {
    api: Api<Lease>,
    name: String,
    duration: Duration,
    renew_interval: Duration,
    node: watch::Receiver<Option<NodeRef>>,
    /// The Lease as last written, so a renewal is one update, not a read and an update. It is
    /// dropped on any error and read afresh.
    latest: Option<Lease>,
}

impl LeaseHeartbeat {
    pub fn new(
        client: kube::Client,
        name: String,
        duration: Duration,
        renew_interval: Duration,
        node: watch::Receiver<Option<NodeRef>>,
    ) -> Self {
        Self {
            api: Api::namespaced(client, NODE_LEASE_NAMESPACE),
            name,
            duration,
            renew_interval,
            node,
            latest: None,
        }
    }

    /// Renews until `shutdown` fires. Waits for the Node to be registered first, so the Lease
    /// always carries its owner.
    pub async fn run(mut self, shutdown: CancellationToken) {
        // Retries back off from 200 ms to the renew interval, then renew at the normal pace.
        let mut backoff = Backoff::new(self.renew_interval);
        loop {
            let owner = tokio::select! {
                _ = shutdown.cancelled() => return,
                owner = self.node.wait_for(Option::is_some) => match owner {
                    Ok(owner) => owner.clone().expect("wait_for returned Some"),
                    Err(_) => return, // the node status manager has stopped: so do we
                },
            };
            let result = match tokio::time::timeout(self.renew_interval, self.renew(&owner)).await {
                Ok(result) => result,
                Err(_) => Err(LeaseError::TimedOut {
                    name: self.name.clone(),
                    after: self.renew_interval,
                }),
            };
            if result.is_err() {
                self.latest = None;
            }
            let wait = match result {
                Ok(()) => {
                    backoff.reset();
                    self.renew_interval
                }
                Err(e) => {
                    let wait = backoff.next();
                    warn!(error = %crate::config::one_line(&e), retry_in = ?wait, "node lease");
                    wait
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
            }
        }
    }

    async fn renew(&mut self, owner: &NodeRef) -> Result<(), LeaseError> {
        let name = self.name.clone();
        let err = move |source| LeaseError::Api {
            name: name.clone(),
            source,
        };
        let now = MicroTime(Utc::now());
        let owner_ref = OwnerReference {
            api_version: "v1".into(),
            kind: "Node".into(),
            name: owner.name.clone(),
            uid: owner.uid.clone(),
            ..Default::default()
        };
        let spec = LeaseSpec {
            holder_identity: Some(self.name.clone()),
            lease_duration_seconds: Some(self.duration.as_secs() as i32),
            renew_time: Some(now),
            ..Default::default()
        };
        let current = match self.latest.take() {
            Some(lease) => Some(lease),
            None => self.api.get_opt(&self.name).await.map_err(&err)?,
        };
        match current {
            Some(mut lease) => {
                let spec_in = lease.spec.get_or_insert_with(Default::default);
                spec_in.holder_identity = spec.holder_identity;
                spec_in.lease_duration_seconds = spec.lease_duration_seconds;
                spec_in.renew_time = spec.renew_time;
                // After the Node was re-registered its UID is new: point the owner at it.
                lease.metadata.owner_references = Some(vec![owner_ref]);
                self.latest = Some(
                    self.api
                        .replace(&self.name, &PostParams::default(), &lease)
                        .await
                        .map_err(&err)?,
                );
                debug!("lease renewed");
            }
            None => {
                let lease = Lease {
                    metadata: ObjectMeta {
                        name: Some(self.name.clone()),
                        namespace: Some(NODE_LEASE_NAMESPACE.into()),
                        owner_references: Some(vec![owner_ref]),
                        ..Default::default()
                    },
                    spec: Some(spec),
                };
                self.latest = Some(
                    self.api
                        .create(&PostParams::default(), &lease)
                        .await
                        .map_err(&err)?,
                );
                debug!("lease created");
            }
        }
        Ok(())
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::Arc;
    use std::task::{Context, Poll};

    use super::*;

    /// An API server that takes every request and never answers (one whose etcd is away).
    #[derive(Clone)]
    pub(crate) struct NeverAnswers(pub(crate) Arc<AtomicUsize>);

    impl tower_service::Service<http::Request<kube::client::Body>> for NeverAnswers {
        type Response = http::Response<kube::client::Body>;
        type Error = Box<dyn std::error::Error + Send + Sync>;
        type Future = futures::future::Pending<Result<Self::Response, Self::Error>>;

        fn poll_ready(&mut self, _: &mut Context<'_>) -> Poll<Result<(), Self::Error>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, _: http::Request<kube::client::Body>) -> Self::Future {
            self.0.fetch_add(1, Ordering::SeqCst);
            futures::future::pending()
        }
    }

    #[tokio::test(start_paused = true)]
    async fn a_renewal_the_api_server_holds_is_given_up_and_tried_again() {
        let calls = Arc::new(AtomicUsize::new(0));
        let client = kube::Client::new(NeverAnswers(calls.clone()), "default");
        let (_tx, node) = watch::channel(Some(NodeRef {
            name: "n".into(),
            uid: "u".into(),
        }));
        let interval = Duration::from_secs(10);
        let heartbeat =
            LeaseHeartbeat::new(client, "n".into(), Duration::from_secs(40), interval, node);
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(heartbeat.run(shutdown.clone()));
        // One minute of an API server that answers nothing: a heartbeat that waited on its
        // first request would have sent that one alone.
        tokio::time::sleep(Duration::from_secs(60)).await;
        let sent = calls.load(Ordering::SeqCst);
        assert!(sent >= 4, "{sent} renewal attempts in a minute");
        shutdown.cancel();
        task.await.unwrap();
    }
}
