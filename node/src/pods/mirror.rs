//! Mirror pods: the API server's view of static pods.
//!
//! For every static pod the node keeps one pod object of the same namespace and name in the
//! API server, annotated `kubernetes.io/config.mirror: <static pod hash>` and owned by the
//! Node, with the same spec (as the kubelet's `pkg/kubelet/pod/mirror_client.go`). This task
//! is the only writer of mirror pods: it creates a missing one, replaces one that is being
//! deleted or belongs to an older version of the static pod, and deletes mirrors whose static
//! pod is gone. It tells the status manager which mirror UID carries each static pod's status.
//! Failed calls are retried on the next pass ([`RESYNC`]).

use std::collections::HashMap;
use std::sync::Arc;
use std::time::Duration;

use k8s_openapi::api::core::v1::Pod;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, OwnerReference};
use kube::api::{DeleteParams, PostParams, Preconditions};
use kube::Api;
use tokio::sync::{mpsc, watch};
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use super::source::PodChange;
use super::static_source::{
    annotation, static_key, MirrorInput, ANNOTATION_HASH, ANNOTATION_MIRROR,
};
use super::status::StatusSender;
use crate::config::one_line;
use crate::node_status::NodeRef;

/// How often failed mirror calls are retried even when nothing else happens.
const RESYNC: Duration = Duration::from_secs(5);

type Name = (String, String);

/// Owns the mirror pods of this node.
pub struct MirrorManager {
    api: kube::Client,
    node: watch::Receiver<Option<NodeRef>>,
    status: StatusSender,
    /// The static pods by namespace/name; `None` until the sources first reported (no
    /// deletions before that, so an agent restart does not churn the mirrors).
    statics: Option<HashMap<Name, Arc<Pod>>>,
    /// Mirror pods as last seen (watch or our own create).
    mirrors: HashMap<Name, Pod>,
    /// Which mirror UID the status manager was last told about, per static pod UID.
    told: HashMap<String, String>,
}

impl MirrorManager {
    pub fn new(
        api: kube::Client,
        node: watch::Receiver<Option<NodeRef>>,
        status: StatusSender,
    ) -> Self {
        Self {
            api,
            node,
            status,
            statics: None,
            mirrors: HashMap::new(),
            told: HashMap::new(),
        }
    }

    pub async fn run(
        mut self,
        mut rx: mpsc::UnboundedReceiver<MirrorInput>,
        shutdown: CancellationToken,
    ) {
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                input = rx.recv() => match input {
                    None => return,
                    Some(input) => {
                        self.absorb(input);
                        while let Ok(input) = rx.try_recv() {
                            self.absorb(input);
                        }
                    }
                },
                changed = self.node.changed() => if changed.is_err() { return },
                _ = tokio::time::sleep(RESYNC) => {}
            }
            self.reconcile().await;
        }
    }

    fn absorb(&mut self, input: MirrorInput) {
        match input {
            MirrorInput::Static(pods) => {
                self.statics = Some(pods.into_iter().map(|p| (name_of(&p), p)).collect());
            }
            MirrorInput::Observed(PodChange::Upsert(pod)) => {
                self.mirrors.insert(name_of(&pod), (*pod).clone());
            }
            MirrorInput::Observed(PodChange::Removed(uid)) => {
                self.mirrors
                    .retain(|_, m| m.metadata.uid.as_deref() != Some(uid.as_str()));
            }
        }
    }

    async fn reconcile(&mut self) {
        let Some(statics) = self.statics.clone() else {
            return;
        };
        let node = self.node.borrow().clone();
        // Mirrors whose static pod is gone.
        let orphans: Vec<Name> = self
            .mirrors
            .keys()
            .filter(|k| !statics.contains_key(*k))
            .cloned()
            .collect();
        for name in orphans {
            if self.delete(&name).await {
                info!(pod = %format!("{}/{}", name.0, name.1), "deleted the mirror pod of a removed static pod");
            }
        }
        for (name, pod) in &statics {
            let hash = annotation(pod, ANNOTATION_HASH)
                .unwrap_or_default()
                .to_string();
            let key = static_key(pod);
            if let Some(mirror) = self.mirrors.get(name) {
                let current = annotation(mirror, ANNOTATION_MIRROR) == Some(hash.as_str())
                    && mirror.metadata.deletion_timestamp.is_none();
                if current {
                    let mirror_uid = mirror.metadata.uid.clone().unwrap_or_default();
                    if self.told.get(&key.uid) != Some(&mirror_uid) {
                        self.told.insert(key.uid.clone(), mirror_uid.clone());
                        self.status.mirror(key, Some(mirror_uid));
                    }
                    continue;
                }
                // Deleted by someone, or an older version of the static pod: replace it.
                debug!(pod = %format!("{}/{}", name.0, name.1), "replacing a stale mirror pod");
                if self.told.remove(&key.uid).is_some() {
                    self.status.mirror(key.clone(), None);
                }
                if !self.delete(name).await {
                    continue;
                }
            }
            let Some(node) = &node else { continue }; // the Node's UID is needed for the owner reference
            match self.create(pod, &hash, node).await {
                Some(created) => {
                    let mirror_uid = created.metadata.uid.clone().unwrap_or_default();
                    self.mirrors.insert(name.clone(), created);
                    self.told.insert(key.uid.clone(), mirror_uid.clone());
                    self.status.mirror(key, Some(mirror_uid));
                }
                None => continue,
            }
        }
        self.told.retain(|uid, _| {
            statics
                .values()
                .any(|p| p.metadata.uid.as_deref() == Some(uid.as_str()))
        });
    }

    /// Deletes the mirror pod `name` (grace 0, UID precondition). True when it is gone.
    async fn delete(&mut self, name: &Name) -> bool {
        let Some(mirror) = self.mirrors.get(name) else {
            return true;
        };
        let api: Api<Pod> = Api::namespaced(self.api.clone(), &name.0);
        let params = DeleteParams {
            grace_period_seconds: Some(0),
            preconditions: Some(Preconditions {
                uid: mirror.metadata.uid.clone(),
                resource_version: None,
            }),
            ..Default::default()
        };
        match api.delete(&name.1, &params).await {
            Ok(_) => {}
            Err(kube::Error::Api(ae)) if ae.code == 404 || ae.code == 409 => {}
            Err(e) => {
                warn!(pod = %format!("{}/{}", name.0, name.1), error = %one_line(&e), "deleting a mirror pod (will retry)");
                return false;
            }
        }
        self.mirrors.remove(name);
        true
    }

    /// Creates the mirror of `pod`. On a name conflict, reads what is there (the next pass
    /// judges it).
    async fn create(&mut self, pod: &Pod, hash: &str, node: &NodeRef) -> Option<Pod> {
        let mirror = mirror_of(pod, hash, node);
        let (ns, name) = name_of(pod);
        let api: Api<Pod> = Api::namespaced(self.api.clone(), &ns);
        match api.create(&PostParams::default(), &mirror).await {
            Ok(created) => {
                info!(pod = %format!("{ns}/{name}"), uid = created.metadata.uid.as_deref().unwrap_or(""), "created the mirror pod");
                Some(created)
            }
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                if let Ok(Some(existing)) = api.get_opt(&name).await {
                    self.mirrors.insert((ns, name), existing);
                }
                None
            }
            Err(e) => {
                warn!(pod = %format!("{ns}/{name}"), error = %one_line(&e), "creating the mirror pod (will retry)");
                None
            }
        }
    }
}

/// The mirror pod of a static pod: same metadata (without the UID), the mirror annotation,
/// owned by the Node, same spec, no status.
pub fn mirror_of(pod: &Pod, hash: &str, node: &NodeRef) -> Pod {
    let mut annotations = pod.metadata.annotations.clone().unwrap_or_default();
    annotations.insert(ANNOTATION_MIRROR.into(), hash.to_string());
    Pod {
        metadata: ObjectMeta {
            name: pod.metadata.name.clone(),
            namespace: pod.metadata.namespace.clone(),
            labels: pod.metadata.labels.clone(),
            annotations: Some(annotations),
            owner_references: Some(vec![OwnerReference {
                api_version: "v1".into(),
                kind: "Node".into(),
                name: node.name.clone(),
                uid: node.uid.clone(),
                controller: Some(true),
                ..Default::default()
            }]),
            ..Default::default()
        },
        spec: pod.spec.clone(),
        status: None,
    }
}

fn name_of(pod: &Pod) -> Name {
    (
        pod.metadata
            .namespace
            .clone()
            .unwrap_or_else(|| "default".into()),
        pod.metadata.name.clone().unwrap_or_default(),
    )
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::pods::static_source::{parse_manifest, Origin};

    #[test]
    fn a_mirror_carries_the_hash_and_is_owned_by_the_node() {
        let text = "apiVersion: v1\nkind: Pod\nmetadata: {name: web, labels: {app: web}}\nspec: {containers: [{name: c, image: 'x:1'}]}\n";
        let pod = &parse_manifest(text, &Origin::File("/m/web.yaml".into()), "n1").unwrap()[0];
        let hash = annotation(pod, ANNOTATION_HASH).unwrap();
        let m = mirror_of(
            pod,
            hash,
            &NodeRef {
                name: "n1".into(),
                uid: "node-uid".into(),
            },
        );
        assert_eq!(annotation(&m, ANNOTATION_MIRROR), Some(hash));
        assert!(
            m.metadata.uid.is_none(),
            "the API server assigns the mirror its own UID"
        );
        assert_eq!(m.metadata.name.as_deref(), Some("web-n1"));
        assert_eq!(m.metadata.labels, pod.metadata.labels);
        let owner = &m.metadata.owner_references.as_ref().unwrap()[0];
        assert_eq!(
            (owner.kind.as_str(), owner.name.as_str(), owner.uid.as_str()),
            ("Node", "n1", "node-uid")
        );
        assert_eq!(m.spec, pod.spec);
    }
}
