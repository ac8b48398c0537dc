//! `/pods`, `/runningpods/` and `/configz`: what the node runs and how it is configured.
//!
//! `/pods` is the kubelet's `PodList` of the pods this node runs (API pods and static pods),
//! each with the status its worker computed last. The view is owned by one task
//! ([`PodsView::start`]); pod workers send it their pod after each sync through a
//! [`PodsViewSender`] and the server reads the latest map through a watch channel.
//! `/runningpods/` is the runtime's view, as the kubelet builds it from the container runtime:
//! pods with at least one running container, with only their names, UID and containers'
//! names and images. `/configz` is `{"kubeletconfig": {...}}`, the effective configuration in
//! KubeletConfiguration field names.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;

use k8s_openapi::api::core::v1::{Container, Pod, PodSpec, PodStatus};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::ObjectMeta;
use provider_api::ContainerState;
use serde_json::{json, Value};
use tokio::sync::{mpsc, watch};

use crate::config::{AuthorizationMode, Config};

/// The pods a node runs, by UID, each with its latest status.
pub type PodMap = Arc<BTreeMap<String, ViewPod>>;

/// One pod of the view: the pod as its worker holds it (shared, not copied: a pod object is
/// several KiB and the node holds thousands) and the status its worker computed last.
#[derive(Clone)]
pub struct ViewPod {
    pub pod: Arc<Pod>,
    pub status: Option<Arc<PodStatus>>,
}

impl ViewPod {
    /// The pod with its latest status in place of the one it came with.
    fn to_value(&self) -> Value {
        let mut value = serde_json::to_value(self.pod.as_ref()).unwrap_or(Value::Null);
        if let (Some(status), Some(object)) = (&self.status, value.as_object_mut()) {
            object.insert(
                "status".into(),
                serde_json::to_value(status.as_ref()).unwrap_or(Value::Null),
            );
        }
        value
    }
}

enum Update {
    Set(String, ViewPod),
    Remove(String),
}

/// Where pod workers report their pod (cheap to clone).
#[derive(Clone)]
pub struct PodsViewSender(Option<mpsc::UnboundedSender<Update>>);

impl PodsViewSender {
    /// A sender that drops everything (a context without a kubelet API).
    pub fn disabled() -> Self {
        PodsViewSender(None)
    }

    /// The pod as it is desired now, with the status its worker computed last.
    pub fn set(&self, pod: &Arc<Pod>, status: Option<Arc<PodStatus>>) {
        let (Some(tx), Some(uid)) = (&self.0, pod.metadata.uid.as_deref()) else {
            return;
        };
        let _ = tx.send(Update::Set(
            uid.to_string(),
            ViewPod {
                pod: pod.clone(),
                status,
            },
        ));
    }

    /// The pod is gone from the node.
    pub fn remove(&self, uid: &str) {
        if let Some(tx) = &self.0 {
            let _ = tx.send(Update::Remove(uid.to_string()));
        }
    }
}

/// The readers' side of the pods view.
#[derive(Clone)]
pub struct PodsView(watch::Receiver<PodMap>);

impl PodsView {
    /// Starts the task that owns the view; it ends when every sender is dropped.
    pub fn start() -> (PodsViewSender, PodsView) {
        let (tx, mut rx) = mpsc::unbounded_channel();
        let (latest_tx, latest_rx) = watch::channel(PodMap::default());
        tokio::spawn(async move {
            let mut pods: BTreeMap<String, ViewPod> = BTreeMap::new();
            while let Some(update) = rx.recv().await {
                match update {
                    Update::Set(uid, pod) => {
                        pods.insert(uid, pod);
                    }
                    Update::Remove(uid) => {
                        pods.remove(&uid);
                    }
                }
                // Publish once per burst of updates, not once per update.
                while let Ok(update) = rx.try_recv() {
                    match update {
                        Update::Set(uid, pod) => pods.insert(uid, pod),
                        Update::Remove(uid) => pods.remove(&uid),
                    };
                }
                latest_tx.send_replace(Arc::new(pods.clone()));
            }
        });
        (PodsViewSender(Some(tx)), PodsView(latest_rx))
    }

    /// A view with no pods that never changes (a server started without pod workers).
    pub fn empty() -> PodsView {
        PodsView(watch::channel(PodMap::default()).1)
    }

    fn latest(&self) -> PodMap {
        self.0.borrow().clone()
    }
}

/// `/pods`: a v1 `PodList` of the node's pods with their latest status, ordered by namespace
/// and name.
pub fn pod_list(view: &PodsView) -> Value {
    let latest = view.latest();
    let mut pods: Vec<&ViewPod> = latest.values().collect();
    pods.sort_by(|a, b| {
        let key = |v: &ViewPod| {
            let m = &v.pod.metadata;
            (m.namespace.clone(), m.name.clone())
        };
        key(a).cmp(&key(b))
    });
    let items: Vec<Value> = pods.into_iter().map(ViewPod::to_value).collect();
    json!({ "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items })
}

/// `/runningpods/`: pods with a running container, from the runtime, with the fields the
/// kubelet fills (name, namespace, uid; each running container's name and image).
pub fn running_pod_list(
    runtime: &crate::pods::pleg::RuntimeSnapshot,
    view: &PodsView,
) -> Result<Value, provider_api::ProviderError> {
    let unavailable = || {
        provider_api::ProviderError::Unavailable("the container runtime cannot be listed".into())
    };
    let sandboxes: HashMap<String, (String, String)> = runtime
        .sandboxes
        .as_ref()
        .ok_or_else(unavailable)?
        .iter()
        .map(|s| (s.pod_uid.clone(), (s.namespace.clone(), s.name.clone())))
        .collect();
    let known = view.latest();
    let mut by_pod: BTreeMap<String, Vec<Container>> = BTreeMap::new();
    let mut containers = runtime.containers.clone().ok_or_else(unavailable)?;
    containers.sort_by(|a, b| a.name.cmp(&b.name));
    for c in containers {
        if !matches!(c.state, ContainerState::Running { .. }) {
            continue;
        }
        // The image as the pod names it when the node knows the pod, else the digest.
        let image = known
            .get(&c.pod_uid)
            .map(|v| &v.pod)
            .and_then(|p| {
                p.spec
                    .as_ref()?
                    .containers
                    .iter()
                    .chain(p.spec.as_ref()?.init_containers.iter().flatten())
                    .find(|s| s.name == c.name)?
                    .image
                    .clone()
            })
            .unwrap_or_else(|| c.image_digest.clone());
        by_pod
            .entry(c.pod_uid.clone())
            .or_default()
            .push(Container {
                name: c.name,
                image: Some(image),
                ..Default::default()
            });
    }
    let items: Vec<Value> = by_pod
        .into_iter()
        .map(|(uid, containers)| {
            let (namespace, name) = sandboxes
                .get(&uid)
                .cloned()
                .or_else(|| {
                    known.get(&uid).map(|ViewPod { pod: p, .. }| {
                        (
                            p.metadata.namespace.clone().unwrap_or_default(),
                            p.metadata.name.clone().unwrap_or_default(),
                        )
                    })
                })
                .unwrap_or_default();
            let pod = Pod {
                metadata: ObjectMeta {
                    name: Some(name),
                    namespace: Some(namespace),
                    uid: Some(uid),
                    ..Default::default()
                },
                spec: Some(PodSpec {
                    containers,
                    ..Default::default()
                }),
                status: None,
            };
            serde_json::to_value(&pod).unwrap_or(Value::Null)
        })
        .collect();
    Ok(json!({ "kind": "PodList", "apiVersion": "v1", "metadata": {}, "items": items }))
}

/// `/configz`: the effective configuration as `{"kubeletconfig": {...}}`, in the field names
/// and units of KubeletConfiguration (durations as Go durations, e.g. `10s`).
pub fn configz(config: &Config) -> Value {
    let d = |d: std::time::Duration| go_duration(d);
    let path = |p: &Option<std::path::PathBuf>| p.as_ref().map(|p| p.display().to_string());
    let eviction_hard: BTreeMap<&str, String> = config
        .eviction_hard
        .iter()
        .map(|t| (t.signal.as_str(), threshold(&t.limit)))
        .collect();
    let eviction_soft: BTreeMap<&str, String> = config
        .eviction_soft
        .iter()
        .map(|t| (t.signal.as_str(), threshold(&t.limit)))
        .collect();
    let soft_grace: BTreeMap<&str, String> = config
        .eviction_soft_grace_period
        .iter()
        .map(|(s, g)| (s.as_str(), d(*g)))
        .collect();
    let minimum_reclaim: BTreeMap<&str, String> = config
        .eviction_minimum_reclaim
        .iter()
        .map(|(s, v)| (s.as_str(), threshold(v)))
        .collect();
    let taints: Vec<Value> = config
        .register_with_taints
        .iter()
        .map(|t| json!({ "key": t.key, "value": t.value, "effect": t.effect }))
        .collect();
    let manifest_headers: BTreeMap<&str, Vec<&str>> =
        config
            .manifest_url_header
            .iter()
            .fold(BTreeMap::new(), |mut m, (k, v)| {
                m.entry(k.as_str())
                    .or_insert_with(Vec::new)
                    .push(v.as_str());
                m
            });
    let mut kubeletconfig = json!({
        "kind": "KubeletConfiguration",
        "apiVersion": "kubelet.config.k8s.io/v1beta1",
        "enableServer": config.enable_server,
        "address": config.address.to_string(),
        "port": config.port,
        "healthzPort": config.healthz_port,
        "healthzBindAddress": "127.0.0.1",
        "tlsCertFile": path(&config.tls_cert_file),
        "tlsPrivateKeyFile": path(&config.tls_private_key_file),
        "authentication": {
            "x509": { "clientCAFile": path(&config.client_ca_file) },
            "webhook": { "enabled": config.authentication_token_webhook, "cacheTTL": "2m0s" },
            "anonymous": { "enabled": config.anonymous_auth },
        },
        "authorization": {
            "mode": match config.authorization_mode { AuthorizationMode::AlwaysAllow => "AlwaysAllow", AuthorizationMode::Webhook => "Webhook" },
            "webhook": { "cacheAuthorizedTTL": "5m0s", "cacheUnauthorizedTTL": "30s" },
        },
        "staticPodPath": path(&config.pod_manifest_path),
        "staticPodURL": config.manifest_url,
        "staticPodURLHeader": manifest_headers,
        "fileCheckFrequency": d(config.file_check_frequency),
        "httpCheckFrequency": d(config.http_check_frequency),
        "syncFrequency": d(config.sync_frequency),
        "nodeStatusUpdateFrequency": d(config.node_status_update_frequency),
        "nodeStatusReportFrequency": d(config.node_status_report_frequency),
        "nodeLeaseDurationSeconds": config.node_lease_duration.as_secs(),
        "housekeepingInterval": d(config.housekeeping_interval),
        "imagePullProgressDeadline": d(config.image_pull_progress_deadline),
        "streamingConnectionIdleTimeout": d(config.streaming_connection_idle_timeout),
        "imageGCHighThresholdPercent": config.image_gc_high_threshold,
        "imageGCLowThresholdPercent": config.image_gc_low_threshold,
        "maxPods": config.max_pods,
        "evictionHard": eviction_hard,
        "evictionSoft": eviction_soft,
        "evictionSoftGracePeriod": soft_grace,
        "evictionMinimumReclaim": minimum_reclaim,
        "evictionPressureTransitionPeriod": d(config.eviction_pressure_transition_period),
        "evictionMaxPodGracePeriod": config.eviction_max_pod_grace_period.as_secs(),
        "imageMinimumGCAge": d(config.minimum_image_ttl_duration),
        "systemReserved": reserved(&config.system_reserved),
        "kubeReserved": reserved(&config.kube_reserved),
        "registerNode": config.register_node,
        "registerWithTaints": taints,
        "providerID": config.provider_id,
        "podLogsDir": config.pod_logs_dir.display().to_string(),
    });
    // Unset optional fields are left out, as the kubelet's JSON leaves them out.
    if let Value::Object(fields) = &mut kubeletconfig {
        fields.retain(|_, v| !v.is_null());
    }
    json!({ "kubeletconfig": kubeletconfig })
}

fn reserved(r: &crate::config::Reserved) -> BTreeMap<&'static str, String> {
    let mut m = BTreeMap::new();
    if r.milli_cpu > 0 {
        m.insert("cpu", format!("{}m", r.milli_cpu));
    }
    if r.memory > 0 {
        m.insert("memory", r.memory.to_string());
    }
    if r.ephemeral_storage > 0 {
        m.insert("ephemeral-storage", r.ephemeral_storage.to_string());
    }
    if r.pid > 0 {
        m.insert("pid", r.pid.to_string());
    }
    m
}

fn threshold(v: &crate::config::ThresholdValue) -> String {
    match v {
        crate::config::ThresholdValue::Quantity(q) => q.to_string(),
        crate::config::ThresholdValue::Percent(p) => format!("{p}%"),
    }
}

/// A duration as Go prints one (`1m0s`, `10s`, `500ms`), which KubeletConfiguration uses.
fn go_duration(d: std::time::Duration) -> String {
    let total = d.as_secs();
    let millis = d.subsec_millis();
    if total == 0 {
        return if millis == 0 {
            "0s".into()
        } else {
            format!("{millis}ms")
        };
    }
    let (h, m, s) = (total / 3600, (total % 3600) / 60, total % 60);
    let secs = if millis == 0 {
        format!("{s}s")
    } else {
        format!("{s}.{}s", format!("{millis:03}").trim_end_matches('0'))
    };
    match (h, m) {
        (0, 0) => secs,
        (0, m) => format!("{m}m{secs}"),
        (h, m) => format!("{h}h{m}m{secs}"),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    #[test]
    fn durations_print_as_go_does() {
        assert_eq!(go_duration(Duration::from_secs(10)), "10s");
        assert_eq!(go_duration(Duration::from_secs(120)), "2m0s");
        assert_eq!(go_duration(Duration::from_secs(3600 + 61)), "1h1m1s");
        assert_eq!(go_duration(Duration::from_millis(500)), "500ms");
        assert_eq!(go_duration(Duration::ZERO), "0s");
        assert_eq!(go_duration(Duration::from_millis(1500)), "1.5s");
    }

    #[test]
    fn configz_names_fields_as_kubelet_configuration() {
        let config = Config::load([
            "wasm-kubelet",
            "--hostname-override",
            "n1",
            "--eviction-hard",
            "memory.available<100Mi",
            "--max-pods",
            "7",
            "--anonymous-auth=true",
        ])
        .unwrap();
        let z = configz(&config);
        let kc = &z["kubeletconfig"];
        assert_eq!(kc["kind"], "KubeletConfiguration");
        assert_eq!(
            kc["evictionHard"]["memory.available"],
            (100u64 << 20).to_string().as_str()
        );
        assert_eq!(kc["maxPods"], 7);
        assert_eq!(kc["authentication"]["anonymous"]["enabled"], true);
        assert_eq!(kc["fileCheckFrequency"], "20s");
        assert!(
            kc.get("staticPodPath").is_none(),
            "unset fields are left out: {kc}"
        );
    }

    #[tokio::test]
    async fn the_view_keeps_the_latest_pod_per_uid_and_forgets_removed_ones() {
        let (tx, mut view) = PodsView::start();
        let pod = |uid: &str, name: &str| Pod {
            metadata: ObjectMeta {
                uid: Some(uid.into()),
                name: Some(name.into()),
                namespace: Some("ns".into()),
                ..Default::default()
            },
            ..Default::default()
        };
        let running = PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        };
        tx.set(&Arc::new(pod("u1", "b")), None);
        tx.set(&Arc::new(pod("u2", "a")), Some(Arc::new(running)));
        tx.set(&Arc::new(pod("u3", "c")), None);
        tx.remove("u3");
        // Wait until the task has applied all four updates.
        while view.latest().len() != 2 || view.latest().contains_key("u3") {
            view.0.changed().await.unwrap();
        }
        let list = pod_list(&view);
        assert_eq!(list["kind"], "PodList");
        let names: Vec<&str> = list["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| p["metadata"]["name"].as_str().unwrap())
            .collect();
        assert_eq!(names, ["a", "b"]);
        assert_eq!(list["items"][0]["status"]["phase"], "Running");
    }

    /// The view holds the worker's pod itself, not a copy (thousands of idle pods each kept a
    /// second copy of their pod object here).
    #[tokio::test]
    async fn the_view_shares_the_pod_it_is_given() {
        let (tx, mut view) = PodsView::start();
        let pod = Arc::new(Pod {
            metadata: ObjectMeta {
                uid: Some("u1".into()),
                name: Some("p".into()),
                ..Default::default()
            },
            status: Some(PodStatus {
                phase: Some("Pending".into()),
                ..Default::default()
            }),
            ..Default::default()
        });
        let running = Arc::new(PodStatus {
            phase: Some("Running".into()),
            ..Default::default()
        });
        tx.set(&pod, Some(running.clone()));
        while view.latest().is_empty() {
            view.0.changed().await.unwrap();
        }
        let latest = view.latest();
        assert!(Arc::ptr_eq(&latest["u1"].pod, &pod));
        assert!(Arc::ptr_eq(latest["u1"].status.as_ref().unwrap(), &running));
        // What /pods shows is the latest status, not the one the pod came with.
        assert_eq!(pod_list(&view)["items"][0]["status"]["phase"], "Running");
    }
}
