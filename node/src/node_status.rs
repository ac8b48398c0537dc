//! Registration and node status: the only writer of this agent's Node object.
//!
//! [`NodeStatusManager::run`] registers the Node (or adopts the one a previous run left), then
//! every `--node-status-update-frequency` reads the Node back, measures the machine, and writes
//! `status` when what it would write differs from what the API server holds, or when
//! `nodeStatusReportFrequency` (5 min) has passed since the last write. Reading the Node back
//! each time is what notices a deleted Node (it registers again) and a status the controller
//! manager overwrote (it is corrected at once). The Node's UID is published on a watch channel
//! for the lease heartbeat, which owns the Lease.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::sync::Arc;

use k8s_openapi::api::core::v1::{
    DaemonEndpoint, Node, NodeAddress, NodeCondition, NodeDaemonEndpoints, NodeSpec, NodeStatus,
    NodeSystemInfo, Taint,
};
use k8s_openapi::apimachinery::pkg::api::resource::Quantity;
use k8s_openapi::apimachinery::pkg::apis::meta::v1::{ObjectMeta, Time};
use k8s_openapi::chrono::Utc;
use kube::api::{Patch, PatchParams, PostParams};
use kube::Api;
use provider_api::{Provider, RuntimeStatus};
use tokio::sync::watch;
use tokio::time::Instant;
use tokio_util::sync::CancellationToken;
use tracing::{debug, info, warn};

use crate::backoff::Backoff;
use crate::config::Config;
use crate::machine::{self, Capacity, HostInfo};

/// The label every wasm-kubelet node carries; deploy/runtimeclass.yaml selects on it.
pub const RUNTIME_LABEL: &str = "wasm-kubelet.io/runtime";
/// Value of [`RUNTIME_LABEL`], and of the taint a Wasm-only node registers with.
pub const RUNTIME_WASM: &str = "wasm";

/// The agent's version as Kubernetes shows it (`kubectl get nodes` VERSION column).
pub const KUBELET_VERSION: &str = concat!("v", env!("CARGO_PKG_VERSION"), "-wasm-kubelet");

/// Errors talking to the API server about the Node. All are retried with backoff.
#[derive(Debug, thiserror::Error)]
pub enum NodeStatusError {
    #[error("registering node {node}: {source}")]
    Register { node: String, source: kube::Error },
    #[error("reading node {node}: {source}")]
    Get { node: String, source: kube::Error },
    #[error("updating node {node} status: {source}")]
    Update { node: String, source: kube::Error },
    #[error("measuring the machine: {0}")]
    Measure(#[from] machine::MeasureError),
    #[error("node {node}: the API server did not answer within {after:?}; trying again")]
    TimedOut {
        node: String,
        after: std::time::Duration,
    },
}

/// The identity of the registered Node, for owner references.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct NodeRef {
    pub name: String,
    pub uid: String,
}

/// Owns the Node object of this agent.
pub struct NodeStatusManager {
    api: Api<Node>,
    config: Arc<Config>,
    provider: Arc<dyn Provider>,
    host: HostInfo,
    node_ref: watch::Sender<Option<NodeRef>>,
    last_write: Option<Instant>,
    /// The pressure conditions, as the eviction manager (their one owner) decides them.
    pressure: watch::Receiver<crate::eviction::Pressure>,
    /// Changes of the runtime process answering (down, back, another one): the Ready
    /// condition follows them at once, not at the next interval.
    runtime_changes: Option<watch::Receiver<Option<provider_remote::RuntimeIdentity>>>,
    /// True once a graceful node shutdown began: Ready is False from then on, written at once.
    shutting_down: Option<watch::Receiver<bool>>,
}

impl NodeStatusManager {
    /// `node_ref` receives the Node's name and UID after each (re-)registration.
    pub fn new(
        client: kube::Client,
        config: Arc<Config>,
        provider: Arc<dyn Provider>,
        node_ref: watch::Sender<Option<NodeRef>>,
    ) -> Self {
        let pressure = watch::channel(crate::eviction::Pressure::default()).1;
        Self {
            api: Api::all(client),
            config,
            provider,
            host: machine::host_info(),
            node_ref,
            last_write: None,
            pressure,
            runtime_changes: None,
            shutting_down: None,
        }
    }

    /// Reports the node not ready, at once, when `shutting_down` turns true (a graceful node
    /// shutdown, see [`crate::pods::node_shutdown`]).
    pub fn with_shutting_down(mut self, shutting_down: watch::Receiver<bool>) -> Self {
        self.shutting_down = Some(shutting_down);
        self
    }

    fn is_shutting_down(&self) -> bool {
        self.shutting_down.as_ref().is_some_and(|s| *s.borrow())
    }

    /// Reports the pressure conditions `pressure` carries (without it, none).
    pub fn with_pressure(mut self, pressure: watch::Receiver<crate::eviction::Pressure>) -> Self {
        self.pressure = pressure;
        self
    }

    /// Writes the status again whenever `changes` does (the runtime process went or came back).
    pub fn with_runtime_changes(
        mut self,
        changes: watch::Receiver<Option<provider_remote::RuntimeIdentity>>,
    ) -> Self {
        self.runtime_changes = Some(changes);
        self
    }

    /// Registers, then keeps the status current until `shutdown` fires.
    pub async fn run(mut self, shutdown: CancellationToken) {
        let mut backoff = Backoff::new(self.config.node_status_update_frequency);
        let mut registered = false;
        // The kubelet's heartbeat client times out after nodeStatusUpdateFrequency, at most the
        // lease duration: an API server that holds a request (etcd away: up to 60 s) must not
        // keep the node from trying again.
        let limit = self
            .config
            .node_status_update_frequency
            .min(self.config.node_lease_duration)
            .max(std::time::Duration::from_secs(1));
        loop {
            let attempt = async {
                if registered {
                    self.sync_status().await
                } else {
                    self.register().await
                }
            };
            let result = match tokio::time::timeout(limit, attempt).await {
                Ok(result) => result,
                Err(_) => Err(NodeStatusError::TimedOut {
                    node: self.config.node_name.clone(),
                    after: limit,
                }),
            };
            let wait = match result {
                Ok(still_registered) => {
                    registered = still_registered;
                    backoff.reset();
                    if registered {
                        self.config.node_status_update_frequency
                    } else {
                        std::time::Duration::ZERO
                    }
                }
                Err(e) => {
                    let wait = backoff.next();
                    warn!(error = %crate::config::one_line(&e), retry_in = ?wait, "node status");
                    wait
                }
            };
            let runtime_changed = async {
                match self.runtime_changes.as_mut() {
                    Some(changes) => {
                        if changes.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            let shutting_down = async {
                match self.shutting_down.as_mut() {
                    Some(s) => {
                        if s.changed().await.is_err() {
                            std::future::pending::<()>().await;
                        }
                    }
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(wait) => {}
                _ = runtime_changed => {}
                _ = shutting_down => {}
            }
        }
    }

    /// Creates the Node, or adopts an existing one of this name. Returns Ok(true) when done.
    async fn register(&mut self) -> Result<bool, NodeStatusError> {
        let name = self.config.node_name.clone();
        let capacity = machine::capacity(&self.config.root_dir)?;
        let wanted = self.initial_node(&capacity);
        let node = match self.api.create(&PostParams::default(), &wanted).await {
            Ok(node) => {
                info!(node = %name, "registered node");
                node
            }
            Err(kube::Error::Api(ae)) if ae.code == 409 => {
                // A previous run registered it: adopt it, reconciling the labels we own.
                let patch = serde_json::json!({ "metadata": { "labels": wanted.metadata.labels } });
                let node = self
                    .api
                    .patch(&name, &PatchParams::default(), &Patch::Merge(&patch))
                    .await
                    .map_err(|source| NodeStatusError::Register {
                        node: name.clone(),
                        source,
                    })?;
                info!(node = %name, "node already registered; adopted it");
                node
            }
            Err(source) => return Err(NodeStatusError::Register { node: name, source }),
        };
        let uid = node.metadata.uid.clone().unwrap_or_default();
        self.node_ref.send_replace(Some(NodeRef { name, uid }));
        self.last_write = None;
        self.write_status_if_needed(&node, capacity).await?;
        Ok(true)
    }

    /// One status interval. Returns Ok(false) when the Node has disappeared and must be
    /// registered again.
    async fn sync_status(&mut self) -> Result<bool, NodeStatusError> {
        let name = &self.config.node_name;
        let node = match self.api.get_opt(name).await {
            Ok(Some(node)) => node,
            Ok(None) => {
                warn!(node = %name, "node object was deleted; registering it again");
                self.node_ref.send_replace(None);
                return Ok(false);
            }
            Err(source) => {
                return Err(NodeStatusError::Get {
                    node: name.clone(),
                    source,
                })
            }
        };
        let current_uid = node.metadata.uid.clone().unwrap_or_default();
        if self.node_ref.borrow().as_ref().map(|r| r.uid.as_str()) != Some(current_uid.as_str()) {
            // Deleted and recreated by someone else between two intervals: follow the new UID.
            self.node_ref.send_replace(Some(NodeRef {
                name: name.clone(),
                uid: current_uid,
            }));
        }
        let capacity = machine::capacity(&self.config.root_dir)?;
        self.write_status_if_needed(&node, capacity).await?;
        Ok(true)
    }

    async fn write_status_if_needed(
        &mut self,
        current: &Node,
        capacity: Capacity,
    ) -> Result<(), NodeStatusError> {
        let runtime = self.provider.status().await;
        let now = Utc::now();
        let observed = current.status.clone().unwrap_or_default();
        let wanted = self.desired_status(&capacity, &runtime, &observed, now);
        let due = self
            .last_write
            .is_none_or(|t| t.elapsed() >= self.config.node_status_report_frequency);
        if !due && same_status(&observed, &wanted) {
            debug!("node status unchanged");
            return Ok(());
        }
        let patch = serde_json::json!({ "status": wanted });
        self.api
            .patch_status(
                &self.config.node_name,
                &PatchParams::default(),
                &Patch::Merge(&patch),
            )
            .await
            .map_err(|source| NodeStatusError::Update {
                node: self.config.node_name.clone(),
                source,
            })?;
        self.last_write = Some(Instant::now());
        debug!("node status written");
        Ok(())
    }

    /// The Node as first registered: metadata and spec; status follows in its own write.
    fn initial_node(&self, _capacity: &Capacity) -> Node {
        let c = &self.config;
        let mut labels = BTreeMap::from([
            ("kubernetes.io/hostname".to_string(), c.node_name.clone()),
            ("kubernetes.io/os".to_string(), "linux".to_string()),
            (
                "kubernetes.io/arch".to_string(),
                self.host.architecture.clone(),
            ),
            (RUNTIME_LABEL.to_string(), RUNTIME_WASM.to_string()),
        ]);
        labels.extend(c.node_labels.clone());
        // A node that runs only Wasm keeps ordinary pods (and DaemonSets) away with this taint;
        // pods of RuntimeClass `wasm` tolerate it (deploy/runtimeclass.yaml). A mixed node
        // (containerd too) runs ordinary pods: no taint.
        let mut taints = Vec::new();
        if c.container_runtime_endpoint.is_none() {
            taints.push(Taint {
                key: RUNTIME_LABEL.into(),
                value: Some(RUNTIME_WASM.into()),
                effect: "NoSchedule".into(),
                time_added: None,
            });
        }
        taints.extend(c.register_with_taints.iter().map(|t| Taint {
            key: t.key.clone(),
            value: t.value.clone(),
            effect: t.effect.clone(),
            time_added: None,
        }));
        Node {
            metadata: ObjectMeta {
                name: Some(c.node_name.clone()),
                labels: Some(labels),
                ..Default::default()
            },
            spec: Some(NodeSpec {
                taints: Some(taints),
                provider_id: c.provider_id.clone(),
                ..Default::default()
            }),
            status: None,
        }
    }

    /// The status this node should show now. Transition times are kept from `observed` for
    /// conditions whose status did not change.
    fn desired_status(
        &self,
        capacity: &Capacity,
        runtime: &RuntimeStatus,
        observed: &NodeStatus,
        now: k8s_openapi::chrono::DateTime<Utc>,
    ) -> NodeStatus {
        let c = &self.config;
        let allocatable = crate::machine::Allocatable::compute(
            capacity,
            &c.system_reserved,
            &c.kube_reserved,
            &c.eviction_hard,
        );

        let resources = |cpu: String, memory: u64, storage: u64| {
            BTreeMap::from([
                ("cpu".to_string(), Quantity(cpu)),
                (
                    "memory".to_string(),
                    Quantity(format!("{}Ki", memory / 1024)),
                ),
                (
                    "ephemeral-storage".to_string(),
                    Quantity(format!("{}Ki", storage / 1024)),
                ),
                ("pods".to_string(), Quantity(c.max_pods.to_string())),
            ])
        };

        // The eviction manager measures the signals against every threshold and keeps a
        // condition through --eviction-pressure-transition-period.
        let crate::eviction::Pressure {
            memory: memory_pressure,
            disk: disk_pressure,
            pid: pid_pressure,
        } = self.pressure.borrow().clone();

        let condition = |kind: &str, status: bool, reason: &str, message: String| {
            let status = if status { "True" } else { "False" }.to_string();
            let previous = observed
                .conditions
                .iter()
                .flatten()
                .find(|c| c.type_ == kind);
            let transition = match previous {
                Some(p) if p.status == status => {
                    p.last_transition_time.clone().unwrap_or(Time(now))
                }
                _ => Time(now),
            };
            NodeCondition {
                type_: kind.to_string(),
                status,
                reason: Some(reason.to_string()),
                message: Some(message),
                last_heartbeat_time: Some(Time(now)),
                last_transition_time: Some(transition),
            }
        };
        let with_detail = |base: &str, detail: Option<String>| match detail {
            Some(d) => format!("{base}: {d}"),
            None => base.to_string(),
        };
        let conditions = vec![
            match &memory_pressure {
                None => condition(
                    "MemoryPressure",
                    false,
                    "KubeletHasSufficientMemory",
                    "kubelet has sufficient memory available".into(),
                ),
                Some(_) => condition(
                    "MemoryPressure",
                    true,
                    "KubeletHasInsufficientMemory",
                    with_detail(
                        "kubelet has insufficient memory available",
                        memory_pressure.clone(),
                    ),
                ),
            },
            match &disk_pressure {
                None => condition(
                    "DiskPressure",
                    false,
                    "KubeletHasNoDiskPressure",
                    "kubelet has no disk pressure".into(),
                ),
                Some(_) => condition(
                    "DiskPressure",
                    true,
                    "KubeletHasDiskPressure",
                    with_detail("kubelet has disk pressure", disk_pressure.clone()),
                ),
            },
            match &pid_pressure {
                None => condition(
                    "PIDPressure",
                    false,
                    "KubeletHasSufficientPID",
                    "kubelet has sufficient PID available".into(),
                ),
                Some(_) => condition(
                    "PIDPressure",
                    true,
                    "KubeletHasInsufficientPID",
                    with_detail(
                        "kubelet has insufficient PID available",
                        pid_pressure.clone(),
                    ),
                ),
            },
            match runtime {
                // The kubelet's shutdown manager error, first of the Ready condition's errors.
                _ if self.is_shutting_down() => condition(
                    "Ready",
                    false,
                    "KubeletNotReady",
                    crate::pods::node_shutdown::NOT_READY_MESSAGE.into(),
                ),
                RuntimeStatus::Ready => condition(
                    "Ready",
                    true,
                    "KubeletReady",
                    "wasm-kubelet is posting ready status".into(),
                ),
                RuntimeStatus::NotReady { message } => condition(
                    "Ready",
                    false,
                    "KubeletNotReady",
                    format!("container runtime is not ready: {message}"),
                ),
            },
        ];

        let mut addresses = Vec::new();
        if let Some(ip) = self.node_ip() {
            addresses.push(NodeAddress {
                type_: "InternalIP".into(),
                address: ip.to_string(),
            });
        }
        addresses.push(NodeAddress {
            type_: "Hostname".into(),
            address: c.node_name.clone(),
        });

        NodeStatus {
            capacity: Some(resources(
                capacity.cpus.to_string(),
                capacity.memory_bytes,
                capacity.ephemeral_storage_bytes,
            )),
            allocatable: Some(resources(
                allocatable.cpu_quantity(),
                allocatable.memory_bytes,
                allocatable.ephemeral_storage_bytes,
            )),
            conditions: Some(conditions),
            addresses: Some(addresses),
            daemon_endpoints: Some(NodeDaemonEndpoints {
                kubelet_endpoint: Some(DaemonEndpoint {
                    port: c.port.into(),
                }),
            }),
            node_info: Some(NodeSystemInfo {
                machine_id: self.host.machine_id.clone(),
                system_uuid: self.host.system_uuid.clone(),
                boot_id: self.host.boot_id.clone(),
                kernel_version: self.host.kernel_version.clone(),
                os_image: self.host.os_image.clone(),
                operating_system: "linux".into(),
                architecture: self.host.architecture.clone(),
                // A mixed node names both: `containerd://1.6.20,wasmtime://48.0.8`.
                container_runtime_version: self
                    .provider
                    .runtimes()
                    .iter()
                    .map(ToString::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
                kubelet_version: KUBELET_VERSION.into(),
                kube_proxy_version: String::new(),
                ..Default::default()
            }),
            ..Default::default()
        }
    }

    /// --node-ip, else the first non-loopback address the hostname resolves to.
    fn node_ip(&self) -> Option<IpAddr> {
        self.config
            .node_ip
            .or_else(|| resolve_node_ip(&self.config.node_name))
    }
}

/// The first non-loopback address `name` resolves to.
pub fn resolve_node_ip(name: &str) -> Option<IpAddr> {
    use std::net::ToSocketAddrs;
    (name, 0)
        .to_socket_addrs()
        .ok()?
        .map(|a| a.ip())
        .find(|ip| !ip.is_loopback())
}

/// Whether `observed` already says what `wanted` says, apart from heartbeat times and the
/// exact free-memory figures inside pressure messages (which change every interval).
fn same_status(observed: &NodeStatus, wanted: &NodeStatus) -> bool {
    let conditions = |s: &NodeStatus| -> Vec<(String, String, Option<String>)> {
        let mut v: Vec<_> = s
            .conditions
            .iter()
            .flatten()
            .map(|c| (c.type_.clone(), c.status.clone(), c.reason.clone()))
            .collect();
        v.sort();
        v
    };
    conditions(observed) == conditions(wanted)
        && observed.capacity == wanted.capacity
        && observed.allocatable == wanted.allocatable
        && observed.addresses == wanted.addresses
        && observed.daemon_endpoints == wanted.daemon_endpoints
        && observed.node_info == wanted.node_info
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An API server that holds every request (its etcd away): the node does not wait on one
    /// request for good, it gives up after the status interval and tries again.
    #[tokio::test(start_paused = true)]
    async fn a_status_write_the_api_server_holds_is_given_up_and_tried_again() {
        use std::sync::atomic::{AtomicUsize, Ordering};
        let calls = Arc::new(AtomicUsize::new(0));
        let client = kube::Client::new(crate::lease::tests::NeverAnswers(calls.clone()), "default");
        let root = std::env::temp_dir().join(format!("wk-node-status-{}", std::process::id()));
        std::fs::create_dir_all(&root).unwrap();
        let config = Config::load([
            "wasm-kubelet",
            "--hostname-override",
            "n",
            "--root-dir",
            root.to_str().unwrap(),
        ])
        .unwrap();
        let (node_ref, _) = watch::channel(None);
        let manager = NodeStatusManager::new(
            client,
            Arc::new(config),
            Arc::new(provider_api::fake::FakeProvider::new()),
            node_ref,
        );
        let shutdown = CancellationToken::new();
        let task = tokio::spawn(manager.run(shutdown.clone()));
        // Two minutes of an API server that answers nothing: a manager that waited on its
        // first request would have sent that one alone.
        tokio::time::sleep(std::time::Duration::from_secs(120)).await;
        let sent = calls.load(Ordering::SeqCst);
        assert!(sent >= 3, "{sent} registration attempts in two minutes");
        shutdown.cancel();
        task.await.unwrap();
        let _ = std::fs::remove_dir_all(&root);
    }

    fn status_with(kind: &str, status: &str, reason: &str) -> NodeStatus {
        NodeStatus {
            conditions: Some(vec![NodeCondition {
                type_: kind.into(),
                status: status.into(),
                reason: Some(reason.into()),
                last_heartbeat_time: Some(Time(Utc::now())),
                ..Default::default()
            }]),
            ..Default::default()
        }
    }

    #[test]
    fn heartbeat_times_alone_are_no_change() {
        let a = status_with("Ready", "True", "KubeletReady");
        let mut b = a.clone();
        b.conditions.as_mut().unwrap()[0].last_heartbeat_time = Some(Time(
            Utc::now() + k8s_openapi::chrono::Duration::seconds(30),
        ));
        assert!(same_status(&a, &b));
    }

    #[test]
    fn a_condition_the_controller_set_to_unknown_is_a_change() {
        let ours = status_with("Ready", "True", "KubeletReady");
        let controllers = status_with("Ready", "Unknown", "NodeStatusUnknown");
        assert!(!same_status(&controllers, &ours));
    }

    #[test]
    fn version_is_semver_shaped() {
        assert!(KUBELET_VERSION.starts_with('v'));
        assert!(KUBELET_VERSION.ends_with("-wasm-kubelet"));
    }
}
