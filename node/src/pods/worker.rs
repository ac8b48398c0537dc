//! One pod worker per pod UID: the only task that acts on that pod's containers.
//!
//! A worker wakes when the pod's spec changes (from the pod source), when the PLEG sees one of
//! its containers change, or when a backoff or deadline timer fires. Each wake is one
//! [`PodWorker::sync`]: admit, make the sandbox, run init containers in order, start or restart
//! app containers per `restartPolicy` with CrashLoopBackOff, then hand the status it computed
//! to the status manager. A deleted pod's containers are stopped within its grace period and
//! the status manager is asked to remove the pod object.

use std::collections::BTreeMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::api::core::v1::{
    Container, ContainerStateTerminated, ObjectReference, Pod, PodStatus, Secret,
};
use k8s_openapi::apimachinery::pkg::apis::meta::v1::Time;
use k8s_openapi::chrono::{DateTime, Utc};
use kube::Api;
use provider_api::{
    ContainerConfig, ContainerState, ExitReason, Mount, Provider, ProviderError, RegistryAuth,
    SandboxConfig,
};
use tokio::sync::{watch, Notify};
use tokio::time::Instant;
use tracing::{debug, info, warn};

use super::admission;
use super::env;
use super::plan;
use super::pod_status::{self, terminated, PodPhase};
use super::resources;
use super::status::{PodKey, StatusSender};
use super::volumes;
use crate::events::EventSink;
use crate::probes::{self, PodProbes};

/// The kubelet's crash-loop backoff: 10 s, doubling, capped at 5 minutes.
pub(super) const BACKOFF_INITIAL: Duration = Duration::from_secs(10);
const BACKOFF_MAX: Duration = Duration::from_secs(300);
/// A container that ran this long without exiting has its backoff reset (the kubelet's value).
const BACKOFF_RESET_AFTER: Duration = Duration::from_secs(600);
/// A volume that could not be set up is tried again after 10 ms, doubling up to 2 s: the usual
/// first failure is the API server's node authorizer not yet knowing a pod bound a moment ago,
/// which it learns within tens of milliseconds...
const VOLUME_RETRY_FIRST: Duration = Duration::from_millis(10);
const VOLUME_RETRY: Duration = Duration::from_secs(2);
/// ...and a FailedMount event is emitted from the sixth failure (about 310 ms in).
const VOLUME_FAILURES_BEFORE_EVENT: u32 = 6;
/// How often a worker re-syncs a pod with nothing to wait for; the PLEG and spec changes wake it sooner.
const RESYNC: Duration = Duration::from_secs(60);

/// What the pod source wants for a pod.
#[derive(Debug, Clone)]
pub struct PodDesire {
    pub pod: Arc<Pod>,
    /// The pod is gone from the API server (deleted outright, or no longer bound here).
    pub removed: bool,
    /// The eviction manager asked for the pod to be evicted (see [`crate::eviction`]).
    pub evict: Option<crate::eviction::Eviction>,
}

/// What every worker shares.
pub struct WorkerContext {
    pub provider: Arc<dyn Provider>,
    /// What the provider runs, as the PLEG last listed it (the one place it is listed).
    pub runtime: super::pleg::RuntimeCache,
    /// Where the kubelet API's `/pods` learns each pod and its latest status.
    pub pods_view: crate::server::pods::PodsViewSender,
    pub client: Option<kube::Client>,
    /// The cluster's RuntimeClasses, watched (a pod's handler routes its sandbox).
    pub runtime_classes: crate::runtime::classes::RuntimeClasses,
    pub status: StatusSender,
    pub events: EventSink,
    pub node_name: String,
    pub node_ip: String,
    pub pods_dir: PathBuf,
    pub pod_logs_dir: PathBuf,
    /// (cpu millicores, memory bytes) for resourceFieldRef without limits.
    pub node_allocatable: (u64, u64),
    /// `--sync-frequency`: how often configMap, secret, downwardAPI and projected volumes are
    /// set up again, so running pods see changed objects.
    pub sync_frequency: Duration,
    /// Which pod holds which host port (the pod IP is the node IP).
    pub host_ports: super::ports::HostPorts,
    /// The admitted pods' requests against node allocatable.
    pub admission: admission::Ledger,
    /// The node's pressure conditions, as the eviction manager decides them: a new pod is
    /// refused while one holds ([`admission::pressure`]).
    pub pressure: tokio::sync::watch::Receiver<crate::eviction::Pressure>,
}

/// What the worker knows about one container of its pod.
#[derive(Debug, Default)]
pub(super) struct ContainerRecord {
    /// The provider's id of the current (latest) instance.
    pub(super) id: Option<String>,
    /// Attempts started so far; the next attempt's number.
    attempts: u32,
    pub(super) restart_count: i32,
    pub(super) image_id: String,
    pub(super) current: Option<ContainerState>,
    /// Why the container is not running, when it waits.
    pub(super) waiting: Option<(String, String)>,
    pub(super) last_terminated: Option<ContainerStateTerminated>,
    pub(super) backoff: Duration,
    /// Not before this instant may the container (or its image pull) be tried again.
    retry_at: Option<Instant>,
    started_at: Option<Instant>,
    /// Hash of the container's spec when it was started: a change restarts the container.
    spec_hash: u64,
    /// Where the current run's terminationMessagePath lands on the host, and its log file.
    termination_file: Option<TerminationFile>,
    log_path: Option<PathBuf>,
    fallback_to_logs: bool,
    /// Known only from the pod's status after an agent restart: not yet seen in the runtime.
    adopting: bool,
    /// An image name that does not parse: not pulled again until the spec names another.
    invalid_image: Option<String>,
}

/// A run's termination-message file: `name` in the host directory `dir` that the container
/// sees at `guest_path`'s parent. The guest owns `dir`, so the file is read beneath it only.
#[derive(Debug, Clone)]
struct TerminationFile {
    dir: PathBuf,
    name: std::ffi::OsString,
    guest_path: String,
}

/// The pod's final outcome once nothing more will run.
#[derive(Debug, Clone)]
pub(super) struct Terminal {
    pub(super) phase: PodPhase,
    pub(super) reason: Option<String>,
    pub(super) message: Option<String>,
    /// Stopped by the node (a pressure eviction, a node shutdown): the pod gets a
    /// DisruptionTarget condition. Not for a pod refused at admission, which never ran.
    pub(super) disruption: bool,
}

/// A pod's containers by name. Boxed records: a B-tree leaf holds 11 values inline, so a
/// one-container pod would otherwise carry ten empty records (~5 KiB) for its whole life.
pub(super) type Records = BTreeMap<String, Box<ContainerRecord>>;

pub struct PodWorker {
    ctx: Arc<WorkerContext>,
    key: PodKey,
    desired: watch::Receiver<PodDesire>,
    nudge: Arc<Notify>,
    pod: Arc<Pod>,
    sandbox: Option<String>,
    /// The sandbox's own IPs once the provider gives them (empty: the pod has the node's IP).
    pod_ips: Vec<std::net::IpAddr>,
    containers: Records,
    start_time: DateTime<Utc>,
    terminal: Option<Terminal>,
    /// The pod's volumes once set up, and when they must be set up again (token refresh).
    volumes: Option<volumes::PodVolumes>,
    volumes_refresh_at: Option<Instant>,
    /// The status last handed to the status manager: transition times are kept from it.
    last_status: Option<PodStatus>,
    /// What was last handed to the `/pods` view (shared with it, not a copy): an unchanged
    /// pod and status are not sent again.
    view_sent: Option<(Arc<Pod>, Option<Arc<PodStatus>>)>,
    volume_failures: u32,
    /// Probe results of the running containers, and the prober tasks behind them.
    probes: PodProbes,
    /// The host ports this pod holds while it may run (dropped: released).
    port_claim: Option<super::ports::PortClaim>,
    /// The pod's place in the admission ledger while it may run (dropped: its requests free).
    admitted: Option<admission::Admitted>,
    /// Whether the runtime's list was searched once for containers of this pod that run
    /// although its status does not say so (see `adopt_or_lose`).
    looked_for_running: bool,
    /// When this worker last changed what the runtime runs (created, started or stopped a
    /// container): the runtime snapshot it reads must be at least this recent.
    acted_at: super::pleg::Mark,
}

impl PodWorker {
    pub fn new(
        ctx: Arc<WorkerContext>,
        desired: watch::Receiver<PodDesire>,
        nudge: Arc<Notify>,
    ) -> Self {
        let pod = desired.borrow().pod.clone();
        let key = PodKey {
            namespace: pod
                .metadata
                .namespace
                .clone()
                .unwrap_or_else(|| "default".into()),
            name: pod.metadata.name.clone().unwrap_or_default(),
            uid: pod.metadata.uid.clone().unwrap_or_default(),
        };
        // Restart counts and start time survive an agent restart through the pod's own status.
        let status = pod.status.clone().unwrap_or_default();
        let start_time = status
            .start_time
            .as_ref()
            .map(|t| t.0)
            .unwrap_or_else(Utc::now);
        let mut containers = BTreeMap::new();
        for cs in status
            .init_container_statuses
            .iter()
            .flatten()
            .chain(status.container_statuses.iter().flatten())
        {
            let state = cs.state.clone().unwrap_or_default();
            let mut record = ContainerRecord {
                restart_count: cs.restart_count,
                attempts: cs.restart_count.max(0) as u32
                    + u32::from(state.running.is_some() || state.terminated.is_some()),
                last_terminated: state
                    .terminated
                    .clone()
                    .or_else(|| cs.last_state.as_ref().and_then(|s| s.terminated.clone())),
                image_id: cs.image_id.clone(),
                ..Default::default()
            };
            if let Some(running) = &state.running {
                // Running when a previous agent stopped: the runtime process may still run it.
                // The first refresh adopts it, or finds it gone (see `refresh`).
                let started = running
                    .started_at
                    .as_ref()
                    .map_or_else(SystemTime::now, |t| SystemTime::from(t.0));
                record.id = cs
                    .container_id
                    .as_deref()
                    .and_then(|id| id.split_once("://").map(|(_, id)| id))
                    .map(str::to_string);
                record.current = Some(ContainerState::Running {
                    started_at: started,
                });
                record.adopting = true;
            }
            containers.insert(cs.name.clone(), Box::new(record));
        }
        let terminal = PodPhase::of(status.phase.as_deref())
            .filter(|p| p.is_terminal())
            .map(|phase| Terminal {
                phase,
                reason: status.reason.clone(),
                message: status.message.clone(),
                disruption: status
                    .conditions
                    .iter()
                    .flatten()
                    .any(|c| c.type_ == "DisruptionTarget" && c.status == "True"),
            });
        let pod_ref = ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(key.namespace.clone()),
            name: Some(key.name.clone()),
            uid: Some(key.uid.clone()),
            ..Default::default()
        };
        let probes = PodProbes::new(
            ctx.provider.clone(),
            ctx.events.clone(),
            ctx.node_ip.clone(),
            pod_ref,
        );
        let acted_at = ctx.runtime.mark();
        Self {
            ctx,
            key,
            desired,
            nudge,
            pod,
            sandbox: None,
            pod_ips: Vec::new(),
            containers,
            start_time,
            terminal,
            volumes: None,
            volumes_refresh_at: None,
            last_status: None,
            view_sent: None,
            volume_failures: 0,
            probes,
            port_claim: None,
            admitted: None,
            looked_for_running: false,
            acted_at,
        }
    }

    /// Runs until the pod is gone; returns its UID.
    pub async fn run(mut self) -> String {
        // For kubelet_pod_worker_duration_seconds{operation} and the pod start histogram.
        let mut operation = "create";
        let mut start_observed = false;
        loop {
            let desire = self.desired.borrow_and_update().clone();
            self.pod = desire.pod.clone();
            let deleting = desire.removed || self.pod.metadata.deletion_timestamp.is_some();
            if let Some(eviction) = desire
                .evict
                .as_ref()
                .filter(|_| self.terminal.is_none() && !deleting)
            {
                Box::pin(self.evict(eviction)).await;
            }
            if deleting {
                let began = Instant::now();
                Box::pin(self.terminate(desire.removed)).await;
                crate::metrics::observe_pod_sync(
                    "kill",
                    began.elapsed(),
                    &self.pod,
                    None,
                    self.start_time,
                    &mut start_observed,
                );
                self.ctx.pods_view.remove(&self.key.uid);
                return self.key.uid;
            }
            let began = Instant::now();
            // Boxed: a sync's state (every step's futures, tens of KiB in a debug build) lives
            // only while it runs, not in the task of every idle pod.
            let wake = Box::pin(self.sync()).await;
            crate::metrics::observe_pod_sync(
                operation,
                began.elapsed(),
                &self.pod,
                self.last_status.as_ref(),
                self.start_time,
                &mut start_observed,
            );
            self.publish_view();
            operation = "sync";
            tokio::select! {
                changed = self.desired.changed() => {
                    if changed.is_err() {
                        // The manager dropped us: the agent is shutting down.
                        return self.key.uid;
                    }
                    operation = "update";
                }
                _ = self.nudge.notified() => {}
                update = self.probes.recv() => {
                    let (_, app) = self.spec_containers();
                    if let Some(kill) = self.probes.apply(update, &app) {
                        Box::pin(self.probe_kill(kill)).await;
                    }
                }
                _ = tokio::time::sleep_until(wake) => {}
            }
        }
    }

    /// Hands the pod and its latest status to the `/pods` view, unless they are what it has.
    fn publish_view(&mut self) {
        if let Some((pod, status)) = &self.view_sent {
            if Arc::ptr_eq(pod, &self.pod) && status.as_deref() == self.last_status.as_ref() {
                return;
            }
        }
        let status = self.last_status.clone().map(Arc::new);
        self.ctx.pods_view.set(&self.pod, status.clone());
        self.view_sent = Some((self.pod.clone(), status));
    }

    fn object_ref(&self) -> ObjectReference {
        ObjectReference {
            api_version: Some("v1".into()),
            kind: Some("Pod".into()),
            namespace: Some(self.key.namespace.clone()),
            name: Some(self.key.name.clone()),
            uid: Some(self.key.uid.clone()),
            ..Default::default()
        }
    }

    fn container_ref(&self, container: &str) -> ObjectReference {
        let mut r = self.object_ref();
        r.field_path = Some(format!("spec.containers{{{container}}}"));
        r
    }

    /// One pass over the pod. Returns when to wake up next at the latest.
    async fn sync(&mut self) -> Instant {
        let now = Instant::now();
        let mut wake = now + RESYNC;
        self.refresh().await;

        if self.terminal.is_none() {
            if let Err((rejection, status_message)) = self.admit().await {
                warn!(reason = %rejection.reason, message = %rejection.message, "pod rejected");
                self.ctx.events.warning(
                    &self.object_ref(),
                    &rejection.reason,
                    rejection.message.clone(),
                );
                self.terminal = Some(Terminal {
                    phase: PodPhase::Failed,
                    reason: Some(rejection.reason),
                    message: Some(status_message),
                    disruption: false,
                });
            }
        }
        if self.terminal.is_none() {
            if let Some(deadline) = self.active_deadline() {
                if Utc::now() >= deadline {
                    self.kill_all(Duration::ZERO, "DeadlineExceeded").await;
                    let message =
                        "Pod was active on the node longer than the specified deadline".to_string();
                    self.ctx
                        .events
                        .normal(&self.object_ref(), "DeadlineExceeded", message.clone());
                    self.terminal = Some(Terminal {
                        phase: PodPhase::Failed,
                        reason: Some("DeadlineExceeded".into()),
                        message: Some(message),
                        disruption: false,
                    });
                } else {
                    let left = (deadline - Utc::now()).to_std().unwrap_or_default();
                    wake = wake.min(now + left);
                }
            }
        }
        if self.terminal.is_none() {
            if let Some(at) = self.run_containers().await {
                wake = wake.min(at);
            }
        }
        self.learn_pod_ips().await;
        // Probes target the pod's own IP (a container pod's is not the node's).
        self.probes.set_pod_ip(self.pod_ip());
        self.reconcile_probes();
        let status = self.compute_status();
        self.last_status = Some(status.clone());
        if self.terminal.is_none() {
            if let Some(phase) = PodPhase::of(status.phase.as_deref()).filter(|p| p.is_terminal()) {
                self.terminal = Some(Terminal {
                    phase,
                    reason: None,
                    message: None,
                    disruption: false,
                });
            }
        }
        if self.terminal.is_some() {
            // A finished pod serves nothing: its ports are free for the next one.
            self.port_claim = None;
        }
        if self.terminal.is_some() {
            // A finished pod's requests no longer count against allocatable.
            self.admitted = None;
        }
        self.ctx.status.set(self.key.clone(), status);
        wake
    }

    /// Admission, as a chain: what the node runs at all (the spec), then the node's pressure
    /// conditions, then the pod's requests against allocatable less what admitted pods
    /// request, then its host ports. The first handler to refuse ends the chain; the one
    /// rejection path is the caller's. A pod admitted once keeps its ticket and its ports
    /// while it may run. A refusal is the rejection (its message is the Event's) and the pod
    /// status's message (pressure and resource refusals say "Pod was rejected: ...", as the
    /// kubelet's).
    async fn admit(&mut self) -> Result<(), (admission::Rejection, String)> {
        let as_is = |r: admission::Rejection| {
            let message = r.message.clone();
            (r, message)
        };
        admission::admit(&self.pod).map_err(as_is)?;
        if self.admitted.is_none() {
            // The kubelet's eviction admit handler comes before the resource predicate.
            let pressure = self.ctx.pressure.borrow().clone();
            admission::pressure(&self.pod, &pressure).map_err(|r| {
                let message = format!("Pod was rejected: {}", r.message);
                (r, message)
            })?;
            let ticket = self.ctx.admission.admit(&self.pod).await.map_err(|r| {
                let message = format!("Pod was rejected: {}", r.message);
                (r, message)
            })?;
            self.admitted = Some(ticket);
        }
        if self.port_claim.is_none() {
            // Whether its ports are the host's is the provider's to say; until it can (a pod
            // routed by its first image), the claim waits for a later pass.
            if let Some(on_node_network) = self.on_node_network().await {
                self.port_claim = Some(
                    self.ctx
                        .host_ports
                        .claim(&self.key.uid, &self.pod, on_node_network)
                        .map_err(as_is)?,
                );
            }
        }
        Ok(())
    }

    /// Whether the pod is reached at the node's addresses ([`Provider::on_node_network`]);
    /// `None` while that cannot be said (its RuntimeClass not found yet, or routed by image).
    async fn on_node_network(&self) -> Option<bool> {
        if !super::ports::declares_ports(&self.pod) {
            return Some(true);
        }
        let handler = self.runtime_handler().await.ok()?;
        self.ctx
            .provider
            .on_node_network(&self.sandbox_config(handler), self.sandbox.as_deref())
    }

    /// The pod's sandbox as the provider is asked to make it.
    fn sandbox_config(&self, runtime_handler: Option<String>) -> SandboxConfig {
        SandboxConfig {
            pod_uid: self.key.uid.clone(),
            namespace: self.key.namespace.clone(),
            name: self.key.name.clone(),
            pod_dir: self.ctx.pods_dir.join(&self.key.uid),
            runtime_handler,
            host_network: self
                .pod
                .spec
                .as_ref()
                .and_then(|s| s.host_network)
                .unwrap_or(false),
        }
    }

    /// Resolves when what the worker has under way for the pod must stop at once: the pod is
    /// being deleted or evicted, its active deadline passed, or the agent is shutting down (the
    /// manager dropped the worker's channel). Owns what it watches, so a step of the executor
    /// can be raced against it while the worker itself is borrowed.
    fn interrupted(&self) -> impl std::future::Future<Output = ()> + Send + 'static {
        let mut desired = self.desired.clone();
        let left = self
            .active_deadline()
            .map(|at| (at - Utc::now()).to_std().unwrap_or_default());
        async move {
            let ends = |d: &PodDesire| {
                d.removed || d.evict.is_some() || d.pod.metadata.deletion_timestamp.is_some()
            };
            let deadline = async {
                match left {
                    Some(left) => tokio::time::sleep(left).await,
                    None => std::future::pending().await,
                }
            };
            tokio::select! {
                _ = desired.wait_for(ends) => {}
                () = deadline => {}
            }
        }
    }

    fn active_deadline(&self) -> Option<DateTime<Utc>> {
        let secs = self.pod.spec.as_ref()?.active_deadline_seconds?;
        Some(self.start_time + k8s_openapi::chrono::Duration::seconds(secs))
    }

    fn spec_containers(&self) -> (Vec<Container>, Vec<Container>) {
        let spec = self.pod.spec.clone().unwrap_or_default();
        (spec.init_containers.unwrap_or_default(), spec.containers)
    }

    fn restart_policy(&self) -> plan::RestartPolicy {
        plan::RestartPolicy::of(
            self.pod
                .spec
                .as_ref()
                .and_then(|s| s.restart_policy.as_deref()),
        )
    }

    /// Reads the provider's view of this pod's containers.
    async fn refresh(&mut self) {
        let snapshot = self.ctx.runtime.newer_than(self.acted_at).await;
        let Some(listed) = snapshot.of_pod(&self.key.uid) else {
            // What runs is unknown while the runtime cannot be asked: keep what was last seen.
            return;
        };
        let listed = listed.to_vec();
        for id in self.adopt_or_lose(&listed) {
            if let Err(e) = self.ctx.provider.remove_container(&id).await {
                warn!(id, error = %e, "cannot remove a container that was never started");
            }
            self.acted_at = self.ctx.runtime.mark();
        }
        let mut oom_killed = Vec::new();
        for summary in listed {
            let Some(record) = self.containers.get_mut(&summary.name) else {
                continue;
            };
            if record.id.as_deref() != Some(summary.id.as_str()) {
                continue;
            }
            if matches!(
                (&record.current, &summary.state),
                (
                    Some(ContainerState::Running { .. }),
                    ContainerState::Running { .. }
                )
            ) {
                continue; // nothing new; keep the start time already reported
            }
            if let ContainerState::Exited {
                started_at,
                finished_at,
                exit_code,
                reason,
                message,
            } = &summary.state
            {
                if !matches!(record.current, Some(ContainerState::Exited { .. })) {
                    if *reason == ExitReason::OomKilled {
                        oom_killed.push((summary.name.clone(), message.clone()));
                    }
                    let message =
                        termination_message(record, *exit_code).or_else(|| message.clone());
                    record.last_terminated = Some(terminated(
                        self.ctx.provider.container_uri(&summary.id),
                        *started_at,
                        *finished_at,
                        *exit_code,
                        *reason,
                        message,
                    ));
                    // A long good run resets the crash-loop backoff.
                    if record
                        .started_at
                        .is_some_and(|t| t.elapsed() >= BACKOFF_RESET_AFTER)
                    {
                        record.backoff = Duration::ZERO;
                    }
                }
            }
            record.current = Some(summary.state);
        }
        // The OOM watcher's part: a container killed for exceeding its memory limit is a
        // Warning Event (node-problem-detector's reason; the kubelet itself only marks the
        // status OOMKilled).
        for (name, detail) in oom_killed {
            let detail = detail.unwrap_or_else(|| "memory limit exceeded".into());
            self.ctx.events.warning(
                &self.container_ref(&name),
                "OOMKilling",
                format!("Container {name} was OOM-killed: {detail}"),
            );
        }
    }

    /// Matches the containers the runtime lists for this pod (`listed`) with the records: one
    /// known only from the pod's status (an agent restart) is adopted as it runs, with what the
    /// run was started with; one the runtime no longer holds (the runtime restarted, or the
    /// agent ran the guests in its own process) is lost, reported as the kubelet reports a
    /// container that vanished, and the restart policy decides, without crash-loop backoff.
    /// One the previous agent created but never started (it died between the two) is not
    /// adopted: its ID is returned for removal and the same attempt starts anew, as the
    /// kubelet always restarts a container it finds in the created state.
    fn adopt_or_lose(&mut self, listed: &[provider_api::ContainerSummary]) -> Vec<String> {
        let mut never_started = Vec::new();
        let (init, app) = self.spec_containers();
        if !self.looked_for_running {
            // Once, at the first answer: a container that runs although the pod's status does
            // not say so (a static pod, whose manifest carries no status; a status write lost
            // with the previous agent) is adopted too, its latest run, rather than started twice.
            self.looked_for_running = true;
            for c in init.iter().chain(app.iter()) {
                let record = self.containers.entry(c.name.clone()).or_default();
                if record.id.is_some() {
                    continue;
                }
                let latest = listed
                    .iter()
                    .filter(|s| s.name == c.name)
                    .max_by_key(|s| s.attempt);
                if let Some(s) = latest.filter(|s| {
                    matches!(
                        s.state,
                        ContainerState::Running { .. } | ContainerState::Created
                    )
                }) {
                    record.id = Some(s.id.clone());
                    record.current = Some(s.state.clone());
                    record.attempts = record.attempts.max(s.attempt + 1);
                    record.restart_count = record.restart_count.max(s.attempt as i32);
                    if record.image_id.is_empty() {
                        let image = c.image.clone().unwrap_or_default();
                        record.image_id = format!(
                            "{}@{}",
                            image.split('@').next().unwrap_or(&image),
                            s.image_digest
                        );
                    }
                    record.adopting = true;
                }
            }
        }
        let pod_dir = self.ctx.pods_dir.join(&self.key.uid);
        let log_dir = self.log_dir();
        for (name, record) in self.containers.iter_mut() {
            let live = matches!(
                record.current,
                Some(ContainerState::Running { .. } | ContainerState::Created)
            );
            let Some(id) = record.id.clone().filter(|_| live) else {
                continue;
            };
            match listed.iter().find(|s| s.id == id) {
                Some(summary) if record.adopting && summary.state == ContainerState::Created => {
                    record.adopting = false;
                    record.id = None;
                    record.current = None;
                    record.attempts = summary.attempt;
                    info!(container = %name, id, "container created but never started by the previous agent; removing it and starting the same attempt anew");
                    never_started.push(id);
                }
                Some(summary) if record.adopting => {
                    record.adopting = false;
                    let attempt = summary.attempt;
                    let spec = init.iter().chain(app.iter()).find(|c| &c.name == name);
                    record.spec_hash = summary
                        .annotations
                        .get(SPEC_HASH_ANNOTATION)
                        .and_then(|h| h.parse().ok())
                        .unwrap_or_else(|| spec.map_or(0, spec_hash));
                    record.termination_file =
                        spec.and_then(|c| termination_file(&pod_dir, c, attempt));
                    record.fallback_to_logs = spec.is_some_and(|c| {
                        c.termination_message_policy.as_deref() == Some("FallbackToLogsOnError")
                    });
                    record.log_path = Some(super::layout::container_log(&log_dir, name, attempt));
                    if let ContainerState::Running { started_at } = summary.state {
                        // The crash-loop backoff resets after a long run, counted from the real start.
                        let ran = SystemTime::now()
                            .duration_since(started_at)
                            .unwrap_or_default();
                        record.started_at =
                            Instant::now().checked_sub(ran).or(Some(Instant::now()));
                    }
                    info!(container = %name, id, attempt, "container adopted from the runtime");
                }
                Some(_) => {}
                None => {
                    record.adopting = false;
                    let started_at = match record.current {
                        Some(ContainerState::Running { started_at }) => {
                            Some(Time(DateTime::<Utc>::from(started_at)))
                        }
                        _ => None,
                    };
                    warn!(container = %name, id, "container not found in the runtime");
                    record.last_terminated = Some(ContainerStateTerminated {
                        container_id: Some(self.ctx.provider.container_uri(&id)),
                        exit_code: 137,
                        reason: Some("ContainerStatusUnknown".into()),
                        message: Some("The container could not be located when the node agent or its container runtime restarted".into()),
                        started_at,
                        finished_at: Some(Time(Utc::now())),
                        signal: None,
                    });
                    record.id = None;
                    record.current = None;
                    record.retry_at = Some(Instant::now());
                    // The runtime lost the pod's sandbox with it.
                    self.sandbox = None;
                    self.pod_ips.clear();
                }
            }
        }
        never_started
    }

    /// The pod's log directory, `<pod logs dir>/<namespace>_<name>_<uid>`.
    fn log_dir(&self) -> PathBuf {
        super::layout::pod_log_dir(
            &self.ctx.pod_logs_dir,
            &self.key.namespace,
            &self.key.name,
            &self.key.uid,
        )
    }

    /// The handler of the pod's RuntimeClass (`None`: the pod names none). An error says why
    /// it cannot be had (no such RuntimeClass, the API server unreachable); the sandbox waits
    /// and retries.
    async fn runtime_handler(&self) -> Result<Option<String>, String> {
        let Some(name) = self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.runtime_class_name.as_deref())
        else {
            return Ok(None);
        };
        self.ctx.runtime_classes.handler(name).await.map(Some)
    }

    /// Starts what should run. Returns the earliest retry instant, if any.
    async fn run_containers(&mut self) -> Option<Instant> {
        if self.sandbox.is_none() {
            let runtime_handler = match self.runtime_handler().await {
                Ok(handler) => handler,
                Err(message) => {
                    warn!(%message, "looking up the pod's RuntimeClass");
                    self.ctx.events.warning(
                        &self.object_ref(),
                        "FailedCreatePodSandBox",
                        format!("Failed to create pod sandbox: {message}"),
                    );
                    return Some(Instant::now() + BACKOFF_INITIAL);
                }
            };
            let config = self.sandbox_config(runtime_handler);
            match self.ctx.provider.run_pod_sandbox(&config).await {
                Ok(id) => self.sandbox = Some(id),
                Err(e) => {
                    warn!(error = %e, "creating the pod sandbox");
                    self.ctx.events.warning(
                        &self.object_ref(),
                        "FailedCreatePodSandBox",
                        format!("Failed to create pod sandbox: {e}"),
                    );
                    return Some(Instant::now() + BACKOFF_INITIAL);
                }
            }
        }
        let mut wake: Option<Instant> = None;
        if self.volumes.is_none()
            || self
                .volumes_refresh_at
                .is_some_and(|at| at <= Instant::now())
        {
            let pod_dir = self.ctx.pods_dir.join(&self.key.uid);
            match volumes::materialize(
                self.ctx.client.as_ref(),
                &self.pod,
                &pod_dir,
                self.volumes.as_ref(),
                self.ctx.node_allocatable,
            )
            .await
            {
                Ok(v) => {
                    self.volume_failures = 0;
                    // Again at the next token refresh or --sync-frequency, whichever is first (at
                    // most every second: a zero frequency must not spin).
                    let every = self.ctx.sync_frequency.max(Duration::from_secs(1));
                    self.volumes_refresh_at =
                        Some(Instant::now() + v.refresh_in.map_or(every, |d| d.min(every)));
                    self.volumes = Some(v);
                }
                Err(e) if self.volumes.is_none() => {
                    // The first failures are often the API server's node authorizer not having
                    // seen this pod yet (a token request right after the pod was bound): retry
                    // fast, and tell the user only when it persists.
                    self.volume_failures += 1;
                    let retry = (VOLUME_RETRY_FIRST
                        * 2u32.saturating_pow(self.volume_failures - 1))
                    .min(VOLUME_RETRY);
                    if self.volume_failures >= VOLUME_FAILURES_BEFORE_EVENT {
                        warn!(error = %e, "setting up volumes");
                        self.ctx
                            .events
                            .warning(&self.object_ref(), "FailedMount", e.to_string());
                    } else {
                        debug!(error = %e, ?retry, "setting up volumes; retrying");
                    }
                    return Some(Instant::now() + retry);
                }
                Err(e) => {
                    // A failed refresh keeps the old files (a token stays valid past 80 % of its life).
                    warn!(error = %e, "refreshing volumes");
                    self.ctx
                        .events
                        .warning(&self.object_ref(), "FailedMount", e.to_string());
                    self.volumes_refresh_at = Some(Instant::now() + VOLUME_RETRY);
                }
            }
        }
        wake = wake.or(self.volumes_refresh_at);
        let policy = self.restart_policy();
        let (init, app) = self.spec_containers();
        let mut earliest = |at: Option<Instant>| {
            if let Some(at) = at {
                wake = Some(wake.map_or(at, |w: Instant| w.min(at)));
            }
        };
        for c in init.iter().chain(&app) {
            self.containers.entry(c.name.clone()).or_default();
        }
        let steps = plan::plan(policy, &hashes(&init), &hashes(&app), |name| {
            self.containers
                .get(name)
                .map(|r| seen(r))
                .unwrap_or_default()
        });
        for step in steps {
            let (name, is_init) = match &step {
                plan::Step::Start { name, init } => (name.clone(), *init),
                plan::Step::Replace { name } => (name.clone(), false),
            };
            let Some(c) = init.iter().chain(&app).find(|c| c.name == name) else {
                continue;
            };
            if matches!(step, plan::Step::Replace { .. }) {
                // The kubelet restarts a container whose definition changed (e.g. a new image),
                // without crash-loop backoff and without counting it as a failure.
                let id = self.containers[&name].id.clone().unwrap_or_default();
                let grace = Duration::from_secs(
                    self.pod
                        .spec
                        .as_ref()
                        .and_then(|s| s.termination_grace_period_seconds)
                        .unwrap_or(30)
                        .max(0) as u64,
                );
                self.ctx.events.normal(
                    &self.container_ref(&name),
                    "Killing",
                    format!("Container {name} definition changed, will be restarted"),
                );
                if let Err(e) = self.ctx.provider.stop_container(&id, grace).await {
                    warn!(container = %name, error = %e, "stopping a changed container");
                }
                self.acted_at = self.ctx.runtime.mark();
                self.refresh().await;
                let record = self.containers.get_mut(&name).expect("record exists");
                record.retry_at = Some(Instant::now());
            }
            let at = self.start_container(c, is_init).await;
            earliest(at);
        }
        wake
    }

    /// Pulls, prepares and starts one container, honouring its backoff. Returns when to retry.
    async fn start_container(&mut self, container: &Container, is_init: bool) -> Option<Instant> {
        let name = container.name.clone();
        let cref = self.container_ref(&name);
        let pod_name = self.key.name.clone();
        let uid = self.key.uid.clone();
        let now = Instant::now();
        {
            let record = self.containers.get_mut(&name).expect("record exists");
            if let Some(at) = record.retry_at {
                if at > now {
                    return Some(at);
                }
            }
        }

        // A restart waits out the crash-loop backoff first (10 s, doubling, capped at 5 min).
        if self.containers[&name].attempts > 0 && self.containers[&name].retry_at.is_none() {
            let at = self.backoff(&name);
            self.ctx.events.warning(
                &cref,
                "BackOff",
                format!(
                    "Back-off restarting failed container {name} in pod {pod_name}_{}({uid})",
                    self.key.namespace
                ),
            );
            return Some(at);
        }
        let image = container.image.clone().unwrap_or_default();
        if self.containers[&name].invalid_image.as_deref() == Some(image.as_str()) {
            return None;
        }

        // Image, per imagePullPolicy.
        let policy = container
            .image_pull_policy
            .clone()
            .unwrap_or_else(|| default_pull_policy(&image).into());
        let present = self.ctx.provider.image_status(&image).await;
        let image_info = match (policy.as_str(), present) {
            ("Never", None) => {
                let msg =
                    format!("Container image \"{image}\" is not present with pull policy of Never");
                self.ctx
                    .events
                    .warning(&cref, "ErrImageNeverPull", msg.clone());
                return self.wait_and_retry(&name, "ErrImageNeverPull", msg);
            }
            ("IfNotPresent" | "Never", Some(info)) => {
                self.ctx.events.normal(
                    &cref,
                    "Pulled",
                    format!("Container image \"{image}\" already present on machine"),
                );
                info
            }
            _ => {
                self.ctx
                    .events
                    .normal(&cref, "Pulling", format!("Pulling image \"{image}\""));
                let auth = self.pull_secrets().await;
                let started = std::time::Instant::now();
                let pull = self.ctx.provider.pull_image(&image, &auth);
                let Some(pulled) = interruptible(self.interrupted(), pull).await else {
                    info!(container = %name, image, "image pull interrupted");
                    return None;
                };
                let result = if pulled.is_ok() { "success" } else { "error" };
                crate::metrics::kubelet()
                    .image_pull_duration
                    .get_or_create(&crate::metrics::PullResultLabels { result })
                    .observe(started.elapsed().as_secs_f64());
                match pulled {
                    Ok(info) => {
                        self.ctx.events.normal(
                            &cref,
                            "Pulled",
                            {
                                // The kubelet's words; the time includes waiting for the same
                                // image's pull under way, if any.
                                let took = provider_wasmtime::image::go_duration(started.elapsed());
                                format!("Successfully pulled image \"{image}\" in {took} ({took} including waiting). Image size: {} bytes.", info.size)
                            },
                        );
                        info
                    }
                    Err(e) => match pull_failure(&image, &e) {
                        PullFailure::InvalidName { message } => {
                            // Not retried: no registry can answer a name that does not parse.
                            // The container waits until the pod names another image.
                            self.ctx
                                .events
                                .warning(&cref, "InspectFailed", message.clone());
                            let record = self.containers.get_mut(&name).expect("record exists");
                            record.invalid_image = Some(image.clone());
                            record.waiting = Some(("InvalidImageName".into(), message));
                            return None;
                        }
                        PullFailure::NotWasm { event, message } => {
                            self.ctx.events.warning(&cref, "Failed", event);
                            self.terminal = Some(Terminal {
                                phase: PodPhase::Failed,
                                reason: Some("UnsupportedImage".into()),
                                message: Some(message),
                                disruption: false,
                            });
                            return None;
                        }
                        PullFailure::Retry { message, cause } => {
                            self.ctx.events.warning(&cref, "Failed", message.clone());
                            self.ctx
                                .events
                                .warning(&cref, "Failed", "Error: ErrImagePull".into());
                            let record = self.containers.get_mut(&name).expect("record exists");
                            let first = !matches!(
                                record.waiting.as_ref().map(|w| w.0.as_str()),
                                Some("ErrImagePull" | "ImagePullBackOff")
                            );
                            let at = self.backoff(&name);
                            if !first {
                                self.ctx.events.normal(
                                    &cref,
                                    "BackOff",
                                    format!("Back-off pulling image \"{image}\""),
                                );
                            }
                            let record = self.containers.get_mut(&name).expect("record exists");
                            record.waiting = Some(if first {
                                ("ErrImagePull".into(), message)
                            } else {
                                (
                                    "ImagePullBackOff".into(),
                                    format!("Back-off pulling image \"{image}\": {cause}"),
                                )
                            });
                            return Some(at);
                        }
                    },
                }
            }
        };

        // Environment. `status.podIP` is the pod's own IP where it has one: a sandbox only
        // recorded so far is made now, on the side of the image just pulled.
        if let Some(sandbox) = self.sandbox.clone() {
            if let Err(e) = self.ctx.provider.place_sandbox(&sandbox, &image).await {
                // create_container meets the same error and reports it.
                debug!(error = %e, "placing the pod sandbox");
            }
            self.learn_pod_ips().await;
        }
        let env = match self.container_env(container).await {
            Ok(env) => env,
            Err(e) => {
                self.ctx
                    .events
                    .warning(&cref, "Failed", format!("Error: {e}"));
                return self.wait_and_retry(&name, "CreateContainerConfigError", e.to_string());
            }
        };
        let command: Vec<String> = container
            .command
            .iter()
            .flatten()
            .map(|s| env::expand(s, &env))
            .collect();
        let args: Vec<String> = container
            .args
            .iter()
            .flatten()
            .map(|s| env::expand(s, &env))
            .collect();

        let attempt = self.containers[&name].attempts;
        let log_dir = self.log_dir().join(&name);
        if let Err(e) = std::fs::create_dir_all(&log_dir) {
            return self.wait_and_retry(
                &name,
                "CreateContainerError",
                format!("creating log directory {}: {e}", log_dir.display()),
            );
        }
        let mut mounts = match self.mounts(container, &env) {
            Ok(m) => m,
            Err(msg) => {
                // As the kubelet's generateContainerConfig failure: a Failed event and the waiting reason.
                self.ctx
                    .events
                    .warning(&cref, "Failed", format!("Error: {msg}"));
                return self.wait_and_retry(&name, "CreateContainerConfigError", msg);
            }
        };
        // terminationMessagePath: the file's directory is given to the container, so whatever it
        // writes there becomes the termination message.
        let pod_dir = self.ctx.pods_dir.join(&uid);
        let termination_file = termination_file(&pod_dir, container, attempt);
        if let Some(file) = &termination_file {
            // Made beneath the pod's directory, and the file made fresh: a directory left by
            // an earlier agent (same attempt number) may hold a guest's symlink by that name.
            let rel = file
                .dir
                .strip_prefix(&pod_dir)
                .unwrap_or(&file.dir)
                .to_path_buf();
            let made = std::fs::create_dir_all(&pod_dir)
                .map_err(|e| e.to_string())
                .and_then(|()| {
                    super::beneath::create_dir_all(&pod_dir, &rel, 0o755).map_err(|e| e.to_string())
                })
                .and_then(|_| {
                    super::beneath::create_empty_file(&file.dir, &file.name, 0o666)
                        .map_err(|e| e.to_string())
                });
            if let Err(e) = made {
                return self.wait_and_retry(
                    &name,
                    "CreateContainerError",
                    format!("creating the termination message file: {e}"),
                );
            }
            let guest_dir = std::path::Path::new(&file.guest_path)
                .parent()
                .unwrap_or(std::path::Path::new("/"));
            if !mounts
                .iter()
                .any(|m| std::path::Path::new(&m.container_path) == guest_dir)
            {
                mounts.push(Mount {
                    host_path: file.dir.clone(),
                    container_path: guest_dir.display().to_string(),
                    read_only: false,
                });
            }
        }
        let log_path = super::layout::container_log(&self.log_dir(), &name, attempt);
        let (cpu_limit_millicores, cpu_request_millicores) = match resources::cpu_limit(container)
            .and_then(|l| Ok((l, resources::container_requests(container)?)))
        {
            Ok((limit, requests)) => (limit, Some(requests.milli_cpu).filter(|m| *m > 0)),
            Err(e) => {
                return self.wait_and_retry(&name, "CreateContainerConfigError", e.to_string())
            }
        };
        let config = ContainerConfig {
            name: name.clone(),
            image: image.clone(),
            command,
            args,
            env,
            working_dir: container.working_dir.clone(),
            mounts,
            log_path: log_path.clone(),
            memory_limit_bytes: memory_limit(container),
            cpu_limit_millicores,
            cpu_request_millicores,
            attempt,
            network: super::ports::container_network(&self.pod, container, &self.ctx.node_ip),
            stdin: container.stdin.unwrap_or(false),
            stdin_once: container.stdin_once.unwrap_or(false),
            annotations: BTreeMap::from([(
                SPEC_HASH_ANNOTATION.to_string(),
                spec_hash(container).to_string(),
            )]),
        };
        let sandbox = self.sandbox.clone().unwrap_or_default();
        let create = self.ctx.provider.create_container(&sandbox, config);
        let created = interruptible(self.interrupted(), create).await;
        // Marked once the call returned: a snapshot begun before that may not hold the container.
        self.acted_at = self.ctx.runtime.mark();
        let Some(created) = created else {
            // The runtime may still create it; a Created container never runs, and the
            // sandbox's removal (the pod's deletion) removes it.
            info!(container = %name, "container creation interrupted");
            return None;
        };
        let id = match created {
            Ok(id) => id,
            Err(e) => {
                self.ctx
                    .events
                    .warning(&cref, "Failed", format!("Error: {e}"));
                return self.wait_and_retry(&name, "CreateContainerError", e.to_string());
            }
        };
        self.ctx
            .events
            .normal(&cref, "Created", format!("Created container: {name}"));
        let started = self.ctx.provider.start_container(&id).await;
        self.acted_at = self.ctx.runtime.mark();
        if let Err(e) = started {
            self.ctx
                .events
                .warning(&cref, "Failed", format!("Error: {e}"));
            return self.wait_and_retry(&name, "RunContainerError", e.to_string());
        }
        self.ctx
            .events
            .normal(&cref, "Started", format!("Started container {name}"));
        info!(container = %name, attempt, is_init, "container started");

        let record = self.containers.get_mut(&name).expect("record exists");
        if record.attempts > 0 {
            record.restart_count += 1;
        }
        record.attempts += 1;
        record.id = Some(id);
        record.image_id = format!(
            "{}@{}",
            image.split('@').next().unwrap_or(&image),
            image_info.digest
        );
        record.current = Some(ContainerState::Running {
            started_at: SystemTime::now(),
        });
        record.waiting = None;
        record.started_at = Some(Instant::now());
        record.spec_hash = spec_hash(container);
        record.termination_file = termination_file;
        record.log_path = Some(log_path);
        record.fallback_to_logs =
            container.termination_message_policy.as_deref() == Some("FallbackToLogsOnError");
        // The next restart waits out the crash-loop backoff.
        record.retry_at = None;
        self.post_start(container).await;
        None
    }

    /// One preopened directory per volumeMount, from the volumes set up for the pod
    /// (subPath and subPathExpr resolved by [`volumes::sub_path`]).
    fn mounts(
        &self,
        container: &Container,
        env: &[(String, String)],
    ) -> Result<Vec<Mount>, String> {
        let mut mounts = Vec::new();
        for (index, vm) in container.volume_mounts.iter().flatten().enumerate() {
            let Some(volume) = self.volumes.as_ref().and_then(|v| v.get(&vm.name)) else {
                return Err(format!(
                    "volumeMount {} names no volume of the pod",
                    vm.name
                ));
            };
            let pin_at = self
                .ctx
                .pods_dir
                .join(&self.key.uid)
                .join("volume-subpaths")
                .join(&vm.name)
                .join(&container.name)
                .join(index.to_string());
            let host_path = volumes::sub_path(volume, vm, env, &container.name, &pin_at)?;
            mounts.push(Mount {
                host_path,
                container_path: vm.mount_path.clone(),
                read_only: volume.read_only || vm.read_only.unwrap_or(false),
            });
        }
        Ok(mounts)
    }

    /// Records a waiting reason and schedules a retry with the container's backoff.
    fn wait_and_retry(&mut self, name: &str, reason: &str, message: String) -> Option<Instant> {
        let at = self.backoff(name);
        let record = self.containers.get_mut(name).expect("record exists");
        record.waiting = Some((reason.into(), message));
        Some(at)
    }

    /// Advances the container's backoff and returns when it may be tried again.
    fn backoff(&mut self, name: &str) -> Instant {
        let record = self.containers.get_mut(name).expect("record exists");
        record.backoff = if record.backoff.is_zero() {
            BACKOFF_INITIAL
        } else {
            (record.backoff * 2).min(BACKOFF_MAX)
        };
        let at = Instant::now() + record.backoff;
        record.retry_at = Some(at);
        at
    }

    async fn pull_secrets(&self) -> Vec<RegistryAuth> {
        let Some(client) = &self.ctx.client else {
            return Vec::new();
        };
        let api: Api<Secret> = Api::namespaced(client.clone(), &self.key.namespace);
        let mut auth = Vec::new();
        for r in self
            .pod
            .spec
            .as_ref()
            .and_then(|s| s.image_pull_secrets.clone())
            .unwrap_or_default()
        {
            if let Ok(Some(secret)) = api.get_opt(&r.name).await {
                if let Some(data) = secret
                    .data
                    .as_ref()
                    .and_then(|d| d.get(".dockerconfigjson"))
                {
                    auth.extend(parse_docker_config(&data.0));
                }
            }
        }
        auth
    }

    async fn container_env(
        &self,
        container: &Container,
    ) -> Result<Vec<(String, String)>, env::EnvError> {
        let refs = env::referenced(container);
        let mut sources = env::Sources {
            host_ip: self.ctx.node_ip.clone(),
            pod_ip: self
                .pod_ips
                .first()
                .map(ToString::to_string)
                .unwrap_or_default(),
            node_allocatable: self.ctx.node_allocatable,
            ..Default::default()
        };
        // Fetched as volumes fetch them; a missing or unreadable object is None here, and
        // env::resolve decides whether that is an error (it is unless the reference is optional).
        let text = |data: BTreeMap<String, Vec<u8>>| {
            data.into_iter()
                .map(|(k, v)| (k, String::from_utf8_lossy(&v).into_owned()))
                .collect()
        };
        let client = self.ctx.client.as_ref();
        for name in refs.config_maps {
            let data = volumes::config_map(client, &self.key.namespace, &name, true)
                .await
                .ok()
                .flatten()
                .map(text);
            sources.config_maps.insert(name, data);
        }
        for name in refs.secrets {
            let data = volumes::secret(client, &self.key.namespace, &name, true)
                .await
                .ok()
                .flatten()
                .map(text);
            sources.secrets.insert(name, data);
        }
        env::resolve(&self.pod, container, &sources)
    }

    /// Stops every container (within `grace`).
    async fn kill_all(&mut self, grace: Duration, why: &str) {
        let running: Vec<(String, String)> = self
            .containers
            .iter()
            .filter(|(_, r)| {
                matches!(
                    r.current,
                    Some(ContainerState::Running { .. }) | Some(ContainerState::Created)
                )
            })
            .filter_map(|(n, r)| Some((n.clone(), r.id.clone()?)))
            .collect();
        let (init, app) = self.spec_containers();
        let pod_ip = self.pod_ip();
        let stops = running.iter().map(|(name, id)| {
            let cref = self.container_ref(name);
            self.ctx
                .events
                .normal(&cref, "Killing", format!("Stopping container {name}"));
            let provider = self.ctx.provider.clone();
            let spec = init.iter().chain(&app).find(|c| &c.name == name);
            let (events, pod_ip) = (&self.ctx.events, pod_ip.as_str());
            async move {
                // The preStop hook runs first, within the grace period.
                if let Err(e) =
                    probes::stop_with_pre_stop(&provider, events, &cref, spec, id, pod_ip, grace)
                        .await
                {
                    debug!(container = %name, error = %e, why, "stopping container");
                }
            }
        });
        futures::future::join_all(stops).await;
        self.acted_at = self.ctx.runtime.mark();
        self.refresh().await;
    }

    /// Node-pressure eviction or graceful node shutdown: stop every container within the
    /// eviction's grace period and end the pod Failed with the eviction's reason (Evicted,
    /// Terminated), as the kubelet's eviction and node shutdown managers do.
    async fn evict(&mut self, eviction: &crate::eviction::Eviction) {
        warn!(reason = eviction.reason, message = %eviction.message, grace = ?eviction.grace, "evicting the pod");
        self.ctx.events.warning(
            &self.object_ref(),
            eviction.reason,
            eviction.message.clone(),
        );
        self.kill_all(eviction.grace, "evicted").await;
        self.terminal = Some(Terminal {
            phase: PodPhase::Failed,
            reason: Some(eviction.reason.into()),
            message: Some(eviction.message.clone()),
            disruption: true,
        });
        // As the kubelet, a terminated pod's volumes are torn down: an emptyDir that filled the
        // disk gives its space back.
        self.volumes = None;
        if let Err(e) = volumes::mount::teardown(&self.ctx.pods_dir.join(&self.key.uid)) {
            warn!(error = %e, "cleaning up the evicted pod's volumes");
        }
    }

    /// The pod is being deleted: stop its containers within the grace period, release the
    /// sandbox, and let the status manager remove the object.
    async fn terminate(&mut self, removed_from_api: bool) {
        let grace = self
            .pod
            .metadata
            .deletion_grace_period_seconds
            .or_else(|| {
                self.pod
                    .spec
                    .as_ref()
                    .and_then(|s| s.termination_grace_period_seconds)
            })
            .unwrap_or(30)
            .max(0) as u64;
        let grace = Duration::from_secs(grace);
        info!(?grace, "terminating pod");
        self.kill_all(grace, "pod deleted").await;
        if let Some(sandbox) = self.sandbox.take() {
            if let Err(e) = self
                .ctx
                .provider
                .remove_pod_sandbox(&sandbox, Duration::ZERO)
                .await
            {
                warn!(error = %e, "removing the pod sandbox");
            }
            // Every reader of the runtime cache (`/runningpods/`, stats, eviction) sees the pod
            // gone before its API object is: a snapshot taken after the removal.
            self.ctx.runtime.fresh().await;
        }
        // Volumes go with the pod: tmpfs unmounted, the pod directory removed.
        self.volumes = None;
        if let Err(e) = volumes::mount::teardown(&self.ctx.pods_dir.join(&self.key.uid)) {
            warn!(error = %e, "cleaning up the pod's volumes");
        }
        if removed_from_api {
            self.ctx.status.forget(self.key.clone());
        } else {
            let status = self.compute_status();
            self.ctx.status.set(self.key.clone(), status);
            self.ctx.status.finalize(self.key.clone());
        }
    }

    /// The pod status as the kubelet writes it: [`pod_status::compute`] of what the worker
    /// knows now.
    fn compute_status(&self) -> PodStatus {
        let previous = self
            .last_status
            .clone()
            .or_else(|| self.pod.status.clone())
            .unwrap_or_default();
        pod_status::compute(&pod_status::Input {
            pod: &self.pod,
            containers: &self.containers,
            ready: &|c| self.probes.ready(c),
            started: &|c| self.probes.started(c),
            terminal: self.terminal.as_ref(),
            sandbox_ready: self.sandbox.is_some(),
            previous: &previous,
            container_uri: &|id| self.ctx.provider.container_uri(id),
            node_ip: &self.ctx.node_ip,
            pod_ips: &self.pod_ips,
            start_time: self.start_time,
            now: Utc::now(),
        })
    }
}

/// Probes and lifecycle hooks (see [`crate::probes`]): the worker's few call sites.
impl PodWorker {
    /// Starts and stops prober tasks to match the containers running now.
    fn reconcile_probes(&mut self) {
        let (_, app) = self.spec_containers();
        let running: Vec<probes::Running<'_>> = app
            .iter()
            .filter_map(|c| {
                let r = self.containers.get(&c.name)?;
                if !matches!(r.current, Some(ContainerState::Running { .. })) {
                    return None;
                }
                Some(probes::Running {
                    container: c,
                    id: r.id.as_deref()?,
                    started_at: r.started_at?,
                })
            })
            .collect();
        self.probes.reconcile(&running);
    }

    /// A liveness or startup probe failed: stop the instance (preStop first) and let the
    /// restart policy, with its backoff, restart it on the next sync.
    async fn probe_kill(&mut self, kill: probes::Kill) {
        let is_current = self.containers.get(&kill.container).is_some_and(|r| {
            r.id.as_deref() == Some(kill.id.as_str())
                && matches!(r.current, Some(ContainerState::Running { .. }))
        });
        if !is_current {
            return;
        }
        let cref = self.container_ref(&kill.container);
        info!(container = %kill.container, kind = ?kill.kind, "probe failed; killing the container");
        self.ctx.events.normal(&cref, "Killing", kill.message());
        let grace = kill.grace.unwrap_or_else(|| self.pod_grace());
        let (init, app) = self.spec_containers();
        let spec = init.iter().chain(&app).find(|c| c.name == kill.container);
        if let Err(e) = probes::stop_with_pre_stop(
            &self.ctx.provider,
            &self.ctx.events,
            &cref,
            spec,
            &kill.id,
            &self.pod_ip(),
            grace,
        )
        .await
        {
            warn!(container = %kill.container, error = %e, "stopping a container that failed its probe");
        }
        self.acted_at = self.ctx.runtime.mark();
        self.refresh().await;
    }

    /// The pod's IPs, once the provider made the sandbox (a Linux container pod's, at its
    /// first container); kept after it goes, as the kubelet keeps a finished pod's podIP.
    async fn learn_pod_ips(&mut self) {
        if let (Some(sandbox), true) = (&self.sandbox, self.pod_ips.is_empty()) {
            self.pod_ips = self.ctx.provider.pod_ips(sandbox).await;
        }
    }

    /// The default host of the pod's probes and lifecycle hooks: its own IP, or the node IP
    /// for a pod without one of its own (a Wasm pod, a hostNetwork pod).
    fn pod_ip(&self) -> String {
        self.pod_ips
            .first()
            .map_or_else(|| self.ctx.node_ip.clone(), |ip| ip.to_string())
    }

    /// Runs the container's postStart hook right after it started; a failure kills the
    /// container (FailedPostStartHook) and the restart policy applies.
    async fn post_start(&mut self, container: &Container) {
        let Some(id) = self
            .containers
            .get(&container.name)
            .and_then(|r| r.id.clone())
        else {
            return;
        };
        self.learn_pod_ips().await;
        let Err(e) =
            probes::run_post_start(&self.ctx.provider, container, &id, &self.pod_ip()).await
        else {
            return;
        };
        // As the kubelet: the hook's output stays out of the event (it may hold secrets).
        warn!(container = %container.name, error = %e, "postStart hook failed");
        let cref = self.container_ref(&container.name);
        self.ctx
            .events
            .warning(&cref, "FailedPostStartHook", "PostStartHook failed".into());
        self.ctx.events.normal(
            &cref,
            "Killing",
            format!(
                "FailedPostStartHook: container {} will be killed",
                container.name
            ),
        );
        if let Err(e) = self
            .ctx
            .provider
            .stop_container(&id, self.pod_grace())
            .await
        {
            warn!(container = %container.name, error = %e, "stopping a container whose postStart hook failed");
        }
        self.acted_at = self.ctx.runtime.mark();
        self.refresh().await;
    }

    /// The pod's terminationGracePeriodSeconds (30 s by default, as the API server defaults it).
    fn pod_grace(&self) -> Duration {
        Duration::from_secs(
            self.pod
                .spec
                .as_ref()
                .and_then(|s| s.termination_grace_period_seconds)
                .unwrap_or(30)
                .max(0) as u64,
        )
    }
}

/// The kubelet reads at most this much of a termination message file (its tail:
/// `kubecontainer.MaxContainerTerminationMessageLength`, read with `tail.ReadAtMost`)...
const MAX_TERMINATION_MESSAGE: usize = 4096;
/// ...and falls back to at most this many log lines and bytes (`readLastStringFromContainerLogs`).
const FALLBACK_LOG_LINES: usize = 80;
const FALLBACK_LOG_BYTES: usize = 2048;
/// How much of a log file's end is read to find those lines: 80 lines of CRI prefix (~40
/// bytes) around 2048 bytes of content, with room for long partial lines.
const FALLBACK_LOG_READ: usize = 64 * 1024;

/// The container's termination message: what it wrote to terminationMessagePath, else (with
/// FallbackToLogsOnError and a failed run) the tail of its log. The file is the guest's: it is
/// read beneath its directory (a symlink out of it, a FIFO or a device is refused, never
/// followed or waited on), and only its last 4096 bytes, as the kubelet reads it.
fn termination_message(record: &ContainerRecord, exit_code: i32) -> Option<String> {
    if let Some(file) = &record.termination_file {
        match super::beneath::read_tail(
            &file.dir,
            std::path::Path::new(&file.name),
            MAX_TERMINATION_MESSAGE,
        ) {
            Ok(bytes) if !bytes.is_empty() => {
                return Some(String::from_utf8_lossy(&bytes).into_owned())
            }
            Ok(_) => {}
            Err(e) if e.is_not_found() => {}
            // As the kubelet ("Error on reading termination log %s: %v"), naming the path the
            // container knows rather than the host's.
            Err(e) => {
                let why = match e {
                    super::beneath::Error::Escapes { .. } => {
                        "the path leads outside the container's termination message directory"
                            .to_string()
                    }
                    super::beneath::Error::NotRegular { .. } => "not a regular file".to_string(),
                    other => other.to_string(),
                };
                warn!(path = %file.guest_path, error = %why, "reading the termination message");
                return Some(format!(
                    "Error on reading termination log {}: {why}",
                    file.guest_path
                ));
            }
        }
    }
    if record.fallback_to_logs && exit_code != 0 {
        let log = record.log_path.as_ref()?;
        let bytes = super::beneath::read_tail(
            log.parent()?,
            std::path::Path::new(log.file_name()?),
            FALLBACK_LOG_READ,
        )
        .ok()?;
        let mut text = String::from_utf8_lossy(&bytes).into_owned();
        if bytes.len() == FALLBACK_LOG_READ {
            // Cut at a line start: the first line read is likely a partial one.
            text = text
                .split_once('\n')
                .map(|(_, rest)| rest.to_string())
                .unwrap_or_default();
        }
        return Some(log_tail(&text, FALLBACK_LOG_LINES, FALLBACK_LOG_BYTES))
            .filter(|s| !s.is_empty());
    }
    None
}

/// The last `lines` lines (at most `bytes` bytes) of a CRI log, without the CRI prefixes.
fn log_tail(cri_log: &str, lines: usize, bytes: usize) -> String {
    let content: Vec<&str> = cri_log
        .lines()
        .filter_map(|l| l.splitn(4, ' ').nth(3))
        .collect();
    let mut text = content[content.len().saturating_sub(lines)..].join("\n");
    if text.len() > bytes {
        let mut cut = text.len() - bytes;
        while !text.is_char_boundary(cut) {
            cut += 1;
        }
        text = text[cut..].to_string();
    }
    text
}

/// A hash of what defines a container, to notice a changed spec.
/// Where run `attempt` of `container` finds its terminationMessagePath on the host: the file's
/// name in `<pod dir>/containers/<name>/<attempt>/`, which the container sees as the path's
/// parent. `None` for a path that is not absolute or names no file.
fn termination_file(
    pod_dir: &std::path::Path,
    container: &Container,
    attempt: u32,
) -> Option<TerminationFile> {
    let guest_path = container
        .termination_message_path
        .clone()
        .unwrap_or_else(|| "/dev/termination-log".into());
    let path = std::path::Path::new(&guest_path);
    let (_, file) = path
        .parent()
        .zip(path.file_name())
        .filter(|_| guest_path.starts_with('/'))?;
    let dir = super::layout::run_dir(pod_dir, &container.name, attempt);
    Some(TerminationFile {
        dir,
        name: file.to_os_string(),
        guest_path,
    })
}

/// Each container's name with the hash of its definition, for [`plan::plan`].
fn hashes(containers: &[Container]) -> Vec<(&str, u64)> {
    containers
        .iter()
        .map(|c| (c.name.as_str(), spec_hash(c)))
        .collect()
}

/// What the plan needs to know of a container (see [`plan::Seen`]).
fn seen(r: &ContainerRecord) -> plan::Seen {
    plan::Seen {
        now: r.current.as_ref().map(|s| match s {
            ContainerState::Created => plan::Now::Created,
            ContainerState::Running { .. } => plan::Now::Running,
            ContainerState::Exited { exit_code, .. } => plan::Now::Exited {
                exit_code: *exit_code,
            },
        }),
        last_exit: r.last_terminated.as_ref().map(|t| t.exit_code),
        has_id: r.id.is_some(),
        attempts: r.attempts,
        started_hash: r.spec_hash,
    }
}

/// Where the spec hash a container was started with is kept in the runtime, so an agent that
/// adopts the container after a restart still sees a definition change.
const SPEC_HASH_ANNOTATION: &str = "wasm-kubelet.io/spec-hash";

/// A hash of the container's definition, stable across agent builds (SHA-256 of its JSON, not
/// std's hasher, whose output may change with the toolchain): an upgraded agent that adopts a
/// running container must not see a changed definition where there is none.
fn spec_hash(c: &Container) -> u64 {
    use sha2::Digest;
    let digest = sha2::Sha256::digest(serde_json::to_vec(c).unwrap_or_default());
    u64::from_be_bytes(digest[..8].try_into().expect("8 of 32 bytes")).max(1)
}

/// `step`'s output, or `None` when `interrupt` resolves first (then `step` is dropped: a pull
/// or a creation is abandoned where it stands).
async fn interruptible<T>(
    interrupt: impl std::future::Future<Output = ()>,
    step: impl std::future::Future<Output = T>,
) -> Option<T> {
    tokio::select! {
        // The interruption first: a pod already deleted starts nothing new.
        biased;
        () = interrupt => None,
        out = step => Some(out),
    }
}

/// What the worker does about a failed pull.
#[derive(Debug, Clone, PartialEq, Eq)]
enum PullFailure {
    /// The name does not parse: InvalidImageName, never pulled again until the spec names
    /// another image (the kubelet's "Failed to apply default image tag").
    InvalidName { message: String },
    /// The image is not Wasm: the pod fails with reason UnsupportedImage.
    NotWasm { event: String, message: String },
    /// Anything else (not found, unauthorized, registry unavailable, another failure):
    /// ErrImagePull, then ImagePullBackOff with the container's backoff. `message` is the
    /// Event's and the first waiting message; `cause` is quoted while backing off.
    Retry { message: String, cause: String },
}

/// The kubelet's reading of a pull error: its event text, whether a retry can help. The
/// typed errors' own text says which failure it was ("not found", "unauthorized", "the
/// registry is unavailable"), as the runtime's message does in the kubelet's.
fn pull_failure(image: &str, e: &ProviderError) -> PullFailure {
    let cause = provider_api::one_line(e);
    match e {
        ProviderError::InvalidImageName(_) => PullFailure::InvalidName {
            message: format!("Failed to apply default image tag \"{image}\": {cause}"),
        },
        ProviderError::UnsupportedImage(message) => PullFailure::NotWasm {
            event: format!("Failed to pull image \"{image}\": {cause}"),
            message: message.clone(),
        },
        _ => PullFailure::Retry {
            message: format!("Failed to pull image \"{image}\": {cause}"),
            cause,
        },
    }
}

/// IfNotPresent for a tagged or digested image, Always for `:latest` or no tag (API defaulting).
fn default_pull_policy(image: &str) -> &'static str {
    if image.contains('@') {
        return "IfNotPresent";
    }
    let last = image.rsplit('/').next().unwrap_or(image);
    match last.split_once(':') {
        Some((_, "latest")) | None => "Always",
        Some(_) => "IfNotPresent",
    }
}

fn memory_limit(c: &Container) -> Option<u64> {
    let q = c.resources.as_ref()?.limits.as_ref()?.get("memory")?;
    // Read as the kubelet reads it (`67108864001m` is 67108865 bytes); admission has already
    // refused a pod whose quantities do not parse.
    crate::quantity::bytes(&q.0).ok()
}

/// Credentials from a `.dockerconfigjson`: `{"auths": {"host": {"username","password"} | {"auth": base64}}}`.
pub fn parse_docker_config(bytes: &[u8]) -> Vec<RegistryAuth> {
    let Ok(doc) = serde_json::from_slice::<serde_json::Value>(bytes) else {
        return Vec::new();
    };
    let Some(auths) = doc.get("auths").and_then(|a| a.as_object()) else {
        return Vec::new();
    };
    let mut out = Vec::new();
    for (host, entry) in auths {
        let registry = host
            .trim_start_matches("https://")
            .trim_start_matches("http://")
            .trim_end_matches('/')
            .to_string();
        let (mut username, mut password) = (
            entry
                .get("username")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
            entry
                .get("password")
                .and_then(|v| v.as_str())
                .unwrap_or_default()
                .to_string(),
        );
        if let Some(auth) = entry.get("auth").and_then(|v| v.as_str()) {
            if let Some(decoded) = base64_decode(auth) {
                if let Some((u, p)) = String::from_utf8_lossy(&decoded).split_once(':') {
                    username = u.to_string();
                    password = p.to_string();
                }
            }
        }
        out.push(RegistryAuth {
            registry,
            username,
            password,
        });
    }
    out
}

fn base64_decode(s: &str) -> Option<Vec<u8>> {
    const ALPHABET: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = Vec::with_capacity(s.len() * 3 / 4);
    let (mut buf, mut bits) = (0u32, 0u32);
    for b in s.bytes().filter(|b| *b != b'=' && !b.is_ascii_whitespace()) {
        let v = ALPHABET.iter().position(|a| *a == b)? as u32;
        buf = (buf << 6) | v;
        bits += 6;
        if bits >= 8 {
            bits -= 8;
            out.push((buf >> bits) as u8);
            buf &= (1 << bits) - 1;
        }
    }
    Some(out)
}

#[cfg(test)]
#[path = "worker_tests.rs"]
mod worker_tests;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn log_tail_strips_cri_prefixes_and_bounds_size() {
        let log = "2026-01-01T00:00:00Z stdout F one\n2026-01-01T00:00:01Z stderr F two words\n";
        assert_eq!(log_tail(log, 80, 2048), "one\ntwo words");
        assert_eq!(log_tail(log, 1, 2048), "two words");
        assert_eq!(log_tail(log, 80, 5), "words");
    }

    #[test]
    fn pull_policy_defaults() {
        assert_eq!(default_pull_policy("127.0.0.1:5000/hello"), "Always");
        assert_eq!(default_pull_policy("127.0.0.1:5000/hello:latest"), "Always");
        assert_eq!(
            default_pull_policy("127.0.0.1:5000/hello:v1"),
            "IfNotPresent"
        );
        assert_eq!(default_pull_policy("r/hello@sha256:abc"), "IfNotPresent");
    }

    #[test]
    fn docker_config_json_both_forms() {
        let json = br#"{"auths":{"127.0.0.1:5443":{"auth":"dXNlcjpwYXNz"},"https://r.example/":{"username":"a","password":"b"}}}"#;
        let mut auths = parse_docker_config(json);
        auths.sort_by(|a, b| a.registry.cmp(&b.registry));
        assert_eq!(
            (
                auths[0].registry.as_str(),
                auths[0].username.as_str(),
                auths[0].password.as_str()
            ),
            ("127.0.0.1:5443", "user", "pass")
        );
        assert_eq!(
            (auths[1].registry.as_str(), auths[1].username.as_str()),
            ("r.example", "a")
        );
        assert!(parse_docker_config(b"not json").is_empty());
    }

    #[test]
    fn pull_errors_map_to_the_kubelets_reasons() {
        let image = "registry.test/app:v1";
        let typed = |make: fn(String, provider_api::Cause) -> ProviderError| {
            make(image.to_string(), "fetching the manifest: 404".into())
        };
        // (error, expected class, words the message must carry)
        let table: Vec<(ProviderError, &str, &str)> = vec![
            (
                typed(|reference, source| ProviderError::ImageNotFound { reference, source }),
                "retry",
                "not found",
            ),
            (
                typed(|reference, source| ProviderError::Unauthorized { reference, source }),
                "retry",
                "unauthorized",
            ),
            (
                typed(|reference, source| ProviderError::RegistryUnavailable { reference, source }),
                "retry",
                "the registry is unavailable",
            ),
            (
                ProviderError::Pull("digest mismatch".into()),
                "retry",
                "digest mismatch",
            ),
            (
                ProviderError::Unavailable("runtime restarting".into()),
                "retry",
                "container runtime unavailable",
            ),
            (
                ProviderError::InvalidImageName("invalid reference format".into()),
                "invalid",
                "Failed to apply default image tag",
            ),
            (
                ProviderError::UnsupportedImage("holds no Wasm layer".into()),
                "not wasm",
                "holds no Wasm layer",
            ),
        ];
        for (error, class, words) in table {
            let failure = pull_failure(image, &error);
            let (got, message) = match &failure {
                PullFailure::Retry { message, .. } => ("retry", message),
                PullFailure::InvalidName { message } => ("invalid", message),
                PullFailure::NotWasm { event, .. } => ("not wasm", event),
            };
            assert_eq!(got, class, "{error:?}");
            assert!(
                message.contains(words) && message.contains(image),
                "{error:?}: {message}"
            );
        }
    }
}
