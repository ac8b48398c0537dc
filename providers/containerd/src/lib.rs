//! wasm-kubelet's container provider: ordinary Linux containers through containerd's own gRPC
//! API (not its CRI plugin), beside the Wasm provider.
//!
//! Start at [`ContainerdProvider`]. The pieces:
//! - [`image`]: pulls with oci-client into containerd's content store, the image record, and
//!   the unpack into the overlayfs snapshotter;
//! - [`spec`]: the OCI runtime spec of a container (argv, env, mounts, limits, privileges) and
//!   [`SandboxNamespaces`], the seam where a pod's network/IPC/UTS namespaces come in;
//! - [`log`]: the CRI-format log file, fed from the task's stdout/stderr by [`log_driver`] (a
//!   process the shim runs, which outlives the agent) or, for a `stdin: true` container, by the
//!   agent's readers of the task's FIFOs;
//! - `exec`, `attach`, `stats`: exec processes, attached clients (and stdin), and CPU and
//!   memory usage from containerd's task metrics.
//!
//! containerd keeps everything: a container is a containerd container record whose labels and
//! one extension hold what the node gave it (pod UID, name, attempt, annotations, the whole
//! [`ContainerConfig`]) and, once it has exited, its exit code, finish time and OOM mark; its
//! task exists while it runs and is deleted once the exit is recorded ([`exit`]), so no shim
//! outlives its container's run. So a new provider instance (an agent restart) lists the same
//! containers, records the exits of those that ended while no agent ran, re-attaches the FIFO
//! log readers of the running `stdin: true` ones, and can stop and remove them. Only the pod
//! sandbox records are the provider's own (a JSON file per pod under the state directory).

mod attach;
pub mod client;
mod exec;
mod exit;
mod forward;
pub mod image;
pub mod log;
pub mod log_driver;
pub mod network;
pub mod spec;
mod stats;

use std::collections::HashMap;
use std::io::Read;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use containerd_client::services::v1::snapshots::{
    MountsRequest, PrepareSnapshotRequest, RemoveSnapshotRequest,
};
use containerd_client::services::v1::{
    container::Runtime, Container, CreateContainerRequest, CreateTaskRequest,
    DeleteContainerRequest, DeleteImageRequest, DeleteTaskRequest, GetContainerRequest,
    GetRequest as GetTaskRequest, KillRequest, ListContainersRequest, ListImagesRequest,
    ListTasksRequest, StartRequest, UpdateContainerRequest, UpdateImageRequest, WaitRequest,
};
use containerd_client::types::v1::{Process, Status as TaskStatus};
use provider_api::{
    AttachIo, ContainerConfig, ContainerState, ContainerSummary, ContainerUsage, ExecIo,
    ExitReason, ImageInfo, ImageRecord, Provider, ProviderError, RegistryAuth, RuntimeInfo,
    RuntimeStatus, SandboxConfig,
};

use crate::client::{is_not_found, status_error, Client, SNAPSHOTTER};
pub use crate::image::RegistryOptions;
use crate::log::{ContainerLog, Stream};
pub use crate::network::PodNetworkOptions;
pub use crate::spec::{Namespace, SandboxNamespaces};

/// The containerd namespace the provider keeps its images and containers in by default.
pub const DEFAULT_NAMESPACE: &str = "wasm-kubelet";
/// The runtime every container runs with: runc through containerd's v2 shim.
const RUNTIME: &str = "io.containerd.runc.v2";
/// The type URL containerd expects for an OCI runtime spec.
const SPEC_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Spec";
/// The container extension holding the node's whole [`ContainerConfig`] (JSON).
const CONFIG_EXTENSION: &str = "io.wasm-kubelet/container-config";
const CONFIG_TYPE_URL: &str = "io.wasm-kubelet/ContainerConfig";

const LABEL_POD_UID: &str = "io.wasm-kubelet/pod-uid";
const LABEL_NAME: &str = "io.wasm-kubelet/name";
const LABEL_ATTEMPT: &str = "io.wasm-kubelet/attempt";
const LABEL_IMAGE_DIGEST: &str = "io.wasm-kubelet/image-digest";
/// When the task was started, unix nanoseconds.
const LABEL_STARTED_AT: &str = "io.wasm-kubelet/started-at";
/// Set when `stop_container` asked the container to stop.
const LABEL_STOP_REQUESTED: &str = "io.wasm-kubelet/stop-requested";
/// Set when the container was stopped before it started (it has no task then).
const LABEL_STOPPED_AT: &str = "io.wasm-kubelet/stopped-at";
/// `true` when the container's cgroup counted an OOM kill (read when it exited).
const LABEL_OOM: &str = "io.wasm-kubelet/oom";
/// The exit status of the container's task, recorded before the task is deleted ([`exit`]).
const LABEL_EXIT_CODE: &str = "io.wasm-kubelet/exit-code";
/// When the container's task exited (containerd's `exited_at`), unix nanoseconds.
const LABEL_FINISHED_AT: &str = "io.wasm-kubelet/finished-at";
/// How the running task's output reaches its log: `binary` (the log driver the shim runs) or
/// `fifo` (the agent reads the task's FIFOs, and re-attaches after a restart).
const LABEL_LOG: &str = "io.wasm-kubelet/log";

/// How long a SIGKILLed task may take to be reported exited before stop gives up.
const KILL_WAIT: Duration = Duration::from_secs(10);
/// The exit code of a process ended by SIGKILL, as shells and the kubelet report it.
const SIGKILL_EXIT: i32 = 137;

/// What the agent's configuration sets in the provider.
#[derive(Debug, Clone)]
pub struct ProviderOptions {
    /// containerd's gRPC socket (`--container-runtime-endpoint`).
    pub socket: PathBuf,
    /// The containerd namespace for images and containers.
    pub namespace: String,
    /// Where the provider keeps its FIFOs and pod sandbox records (under the agent's root dir).
    pub state_dir: PathBuf,
    /// Plain-http registries and extra CAs, as the Wasm provider's.
    pub registries: RegistryOptions,
    /// The cgroup every container's cgroup is made under (cgroupfs paths, e.g.
    /// `/wasm-kubelet/<namespace>`).
    pub cgroup_parent: String,
    /// containerd's root directory (the image filesystem), when known.
    pub image_fs_path: Option<PathBuf>,
    /// The pod network (`--pod-cidr`): each pod's own network, IPC and UTS namespaces and an
    /// IP on the node's bridge. `None`: each container gets private namespaces (loopback only).
    pub pod_network: Option<PodNetworkOptions>,
    /// The program containerd's shim runs as each container's log driver,
    /// `<program> container-log <log path>` ([`log_driver`]): the agent's own binary. It
    /// writes the CRI log for as long as the task exists, agent or no agent. `None`, and for
    /// containers with `stdin: true` (a `binary://` log gives the task no stdin): the agent
    /// reads the task's output FIFOs itself, and output written while no agent runs waits in
    /// the FIFOs (64 KiB, then the container blocks) or, after an exit, is lost.
    pub log_driver: Option<PathBuf>,
}

impl ProviderOptions {
    /// The defaults for `socket` with state under `state_dir`.
    pub fn new(socket: PathBuf, state_dir: PathBuf) -> Self {
        Self {
            socket,
            namespace: DEFAULT_NAMESPACE.into(),
            state_dir,
            registries: RegistryOptions::default(),
            cgroup_parent: format!("/wasm-kubelet/{DEFAULT_NAMESPACE}"),
            image_fs_path: None,
            pod_network: None,
            log_driver: None,
        }
    }
}

/// A pod sandbox: a record of the namespaces its containers join (made by the pod network,
/// see [`network`], or given to [`ContainerdProvider::run_pod_sandbox_in`]) and its IPs.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Sandbox {
    config: SandboxConfig,
    namespaces: SandboxNamespaces,
    /// The pod's IPs on the pod network (empty: none of its own).
    #[serde(default)]
    ips: Vec<std::net::IpAddr>,
}

/// Runs Linux containers with containerd and runc.
pub struct ContainerdProvider {
    client: Client,
    options: ProviderOptions,
    version: String,
    sandboxes: Mutex<HashMap<String, Sandbox>>,
    network: Option<network::Network>,
    /// What attached clients join: each running container's output channel and stdin.
    streams: attach::Streams,
    /// Records exits and deletes exited tasks (so their shims exit).
    reaper: exit::Reaper,
}

/// 128 random bits as hex, from the kernel.
pub(crate) fn random_id() -> String {
    let mut bytes = [0u8; 16];
    let read = std::fs::File::open("/dev/urandom").and_then(|mut f| f.read_exact(&mut bytes));
    if read.is_err() {
        // Unreachable on Linux; the time and a counter are unique within this process anyway.
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
        let t = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos() as u64);
        bytes[..8].copy_from_slice(&t.to_le_bytes());
        bytes[8..].copy_from_slice(&(n ^ u64::from(std::process::id())).to_le_bytes());
    }
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

fn nanos_since_epoch(t: SystemTime) -> u128 {
    t.duration_since(SystemTime::UNIX_EPOCH)
        .map_or(0, |d| d.as_nanos())
}

fn time_from_nanos(s: &str) -> Option<SystemTime> {
    let n: u128 = s.parse().ok()?;
    Some(SystemTime::UNIX_EPOCH + Duration::from_nanos(n.min(u64::MAX as u128) as u64))
}

fn time_from_proto(t: &prost_types::Timestamp) -> SystemTime {
    if t.seconds < 0 {
        return SystemTime::UNIX_EPOCH;
    }
    SystemTime::UNIX_EPOCH + Duration::new(t.seconds as u64, t.nanos.max(0) as u32)
}

impl ContainerdProvider {
    /// Connects to containerd (it must answer), reads the pod sandbox records and re-attaches
    /// the log readers of the containers still running.
    pub async fn connect(options: ProviderOptions) -> Result<Self, ProviderError> {
        let client = Client::connect(&options.socket, &options.namespace).await?;
        let version = client
            .version()
            .version(client.req(()))
            .await
            .map_err(|e| {
                ProviderError::Unavailable(format!(
                    "containerd at {} does not answer: {}",
                    options.socket.display(),
                    e.message()
                ))
            })?
            .into_inner()
            .version;
        for dir in ["sandboxes", "fifos"] {
            let path = options.state_dir.join(dir);
            std::fs::create_dir_all(&path)
                .map_err(|e| ProviderError::Setup(format!("creating {}: {e}", path.display())))?;
        }
        let sandboxes = load_sandboxes(&options.state_dir.join("sandboxes"));
        let network = match &options.pod_network {
            Some(net) => Some(network::Network::start(net).await?),
            None => None,
        };
        let reaper = exit::Reaper::new(client.clone(), &options.cgroup_parent);
        let provider = Self {
            client,
            reaper,
            options,
            version,
            sandboxes: Mutex::new(sandboxes),
            network,
            streams: attach::Streams::default(),
        };
        provider.adopt().await?;
        Ok(provider)
    }

    /// Creates the pod's sandbox record with the namespaces its containers join.
    pub async fn run_pod_sandbox_in(
        &self,
        config: &SandboxConfig,
        namespaces: SandboxNamespaces,
    ) -> Result<String, ProviderError> {
        self.record_sandbox(config, namespaces, Vec::new())
    }

    fn record_sandbox(
        &self,
        config: &SandboxConfig,
        namespaces: SandboxNamespaces,
        ips: Vec<std::net::IpAddr>,
    ) -> Result<String, ProviderError> {
        let sandbox = Sandbox {
            config: config.clone(),
            namespaces,
            ips,
        };
        let path = self.sandbox_path(&config.pod_uid)?;
        let json = serde_json::to_vec(&sandbox)
            .map_err(|e| ProviderError::Io(format!("encoding the sandbox record: {e}")))?;
        write_atomically(&path, &json)
            .map_err(|e| ProviderError::Io(format!("writing {}: {e}", path.display())))?;
        self.sandboxes().insert(config.pod_uid.clone(), sandbox);
        Ok(config.pod_uid.clone())
    }

    fn sandboxes(&self) -> std::sync::MutexGuard<'_, HashMap<String, Sandbox>> {
        self.sandboxes.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn sandbox_path(&self, pod_uid: &str) -> Result<PathBuf, ProviderError> {
        // A pod UID is a UUID; anything else must not name a path.
        if pod_uid.is_empty()
            || !pod_uid
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_')
        {
            return Err(ProviderError::Create(format!(
                "pod UID {pod_uid:?} is not a UID"
            )));
        }
        Ok(self
            .options
            .state_dir
            .join("sandboxes")
            .join(format!("{pod_uid}.json")))
    }

    fn fifo_dir(&self, id: &str) -> PathBuf {
        self.options.state_dir.join("fifos").join(id)
    }

    fn cgroups_path(&self, id: &str) -> String {
        format!("{}/{id}", self.options.cgroup_parent.trim_end_matches('/'))
    }

    async fn get_container(&self, id: &str) -> Result<Container, ProviderError> {
        valid_id(id)?;
        self.client
            .containers()
            .get(self.client.req(GetContainerRequest { id: id.to_string() }))
            .await
            .map_err(|e| status_error(&format!("container {id}"), e))?
            .into_inner()
            .container
            .ok_or_else(|| ProviderError::NotFound(format!("container {id}")))
    }

    /// The container's task, if it has one.
    async fn get_task(&self, id: &str) -> Result<Option<Process>, ProviderError> {
        match self
            .client
            .tasks()
            .get(self.client.req(GetTaskRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(reply) => Ok(reply.into_inner().process),
            Err(e) if is_not_found(&e) => Ok(None),
            Err(e) => Err(status_error(&format!("task of container {id}"), e)),
        }
    }

    async fn set_labels(&self, id: &str, labels: &[(&str, String)]) -> Result<(), ProviderError> {
        let container = Container {
            id: id.to_string(),
            labels: labels
                .iter()
                .map(|(k, v)| (k.to_string(), v.clone()))
                .collect(),
            ..Default::default()
        };
        let paths = labels.iter().map(|(k, _)| format!("labels.{k}")).collect();
        self.client
            .containers()
            .update(self.client.req(UpdateContainerRequest {
                container: Some(container),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|e| status_error(&format!("updating container {id}"), e))?;
        Ok(())
    }

    /// Waits for the task to exit, at most `limit`; true when it has.
    async fn wait_task(&self, id: &str, limit: Duration) -> Result<bool, ProviderError> {
        let mut tasks = self.client.tasks();
        let wait = tasks.wait(self.client.req(WaitRequest {
            container_id: id.to_string(),
            exec_id: String::new(),
        }));
        match tokio::time::timeout(limit, wait).await {
            Err(_) => Ok(false),
            Ok(Ok(_)) => Ok(true),
            Ok(Err(e)) if is_not_found(&e) => Ok(true),
            Ok(Err(e)) => Err(status_error(&format!("waiting for container {id}"), e)),
        }
    }

    async fn kill(&self, id: &str, signal: u32, all: bool) -> Result<(), ProviderError> {
        match self
            .client
            .tasks()
            .kill(self.client.req(KillRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
                signal,
                all,
            }))
            .await
        {
            Ok(_) => Ok(()),
            // Already gone: nothing to signal.
            Err(e) if is_not_found(&e) => Ok(()),
            Err(e) => Err(status_error(&format!("signalling container {id}"), e)),
        }
    }

    /// Starts copying the task's output FIFOs into the log (containers without the log driver):
    /// one thread per stream, each blocked in `open` until the shim opens the FIFO's write end
    /// (`adopting`: it has, open at once).
    fn copy_output(
        &self,
        id: &str,
        log: &ContainerLog,
        adopting: bool,
    ) -> Result<(), ProviderError> {
        let dir = self.fifo_dir(id);
        for (stream, name) in [(Stream::Stdout, "stdout"), (Stream::Stderr, "stderr")] {
            let path = dir.join(name);
            let log = log.clone();
            let open = move || -> std::io::Result<std::fs::File> {
                if adopting {
                    // Non-blocking open (the writer exists), then a blocking reader.
                    let file = std::fs::OpenOptions::new()
                        .read(true)
                        .custom_flags(libc::O_NONBLOCK)
                        .open(&path)?;
                    set_blocking(&file)?;
                    Ok(file)
                } else {
                    std::fs::File::open(&path)
                }
            };
            std::thread::Builder::new()
                .name(format!("ctd-log-{name}"))
                .spawn(move || match open() {
                    Ok(file) => log.copy_from(stream, file),
                    Err(e) => tracing::warn!(error = %e, stream = name, "opening the container's output FIFO failed"),
                })
                .map_err(|e| ProviderError::Io(format!("starting a log reader: {e}")))?;
        }
        Ok(())
    }

    /// Ends the FIFO readers of a task that never opened them (its creation failed): a writer
    /// that opens and closes each FIFO gives them end of file.
    fn release_fifos(&self, id: &str) {
        for name in ["stdout", "stderr"] {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(self.fifo_dir(id).join(name));
        }
    }

    /// Watches the task's exit, then records it in the container record and deletes the
    /// task, so its shim exits ([`exit`]).
    fn watch_exit(&self, id: &str) {
        let client = self.client.clone();
        let reaper = self.reaper.clone();
        let id = id.to_string();
        tokio::spawn(async move {
            let waited = client
                .tasks()
                .wait(client.req(WaitRequest {
                    container_id: id.clone(),
                    exec_id: String::new(),
                }))
                .await;
            // Gone already (reaped by a stop or a listing) or containerd away: whoever finds
            // the exited task next reaps it.
            if waited.is_err() {
                return;
            }
            match reaper.reap(&id).await {
                Ok(exit::Reaped::Deleted { exit_code, oom }) => {
                    tracing::info!(id, exit_code, oom, "container exited")
                }
                Ok(exit::Reaped::Nothing) => {}
                Err(e) => {
                    tracing::warn!(id, error = %e, "recording an exit failed; retried at the next listing")
                }
            }
        });
    }

    /// Re-attaches FIFO log readers (not for the log driver's containers: it never stopped) and
    /// exit watchers to the containers whose tasks still run; records the exits of those whose
    /// tasks exited while no agent ran (or before the last one deleted them) and deletes them.
    async fn adopt(&self) -> Result<(), ProviderError> {
        let tasks = self.list_tasks().await?;
        for container in self.list_records().await? {
            let Some(task) = tasks.get(&container.id) else {
                continue;
            };
            if task.status == TaskStatus::Stopped as i32 {
                match self.reaper.reap(&container.id).await {
                    Ok(exit::Reaped::Deleted { exit_code, oom }) => tracing::info!(
                        id = container.id,
                        exit_code,
                        oom,
                        "recorded the exit of a container that ended while no agent ran"
                    ),
                    Ok(exit::Reaped::Nothing) => {}
                    Err(e) => {
                        tracing::warn!(id = container.id, error = %e, "recording an exit failed; retried at the next listing")
                    }
                }
                continue;
            }
            if task.status != TaskStatus::Running as i32 && task.status != TaskStatus::Paused as i32
            {
                continue;
            }
            let Some(config) = stored_config(&container) else {
                continue;
            };
            let driven = container
                .labels
                .get(LABEL_LOG)
                .is_some_and(|v| v == "binary");
            if !driven {
                match ContainerLog::open(&config.log_path) {
                    Ok(log) => {
                        if let Err(e) = self.copy_output(&container.id, &log, true) {
                            tracing::warn!(id = container.id, error = %e, "re-attaching the log failed");
                        }
                    }
                    Err(e) => {
                        tracing::warn!(id = container.id, error = %e, "opening the log failed")
                    }
                }
            }
            // The previous agent's end of stdin closed with it (the container read end of
            // file then); a container without stdinOnce can be attached to again.
            if config.stdin && !config.stdin_once {
                let path = self.fifo_dir(&container.id).join("stdin");
                if let Err(e) = self.streams.open_stdin(&container.id, &path) {
                    tracing::warn!(id = container.id, error = %e, "re-opening stdin failed");
                }
            }
            self.watch_exit(&container.id);
            tracing::info!(
                id = container.id,
                name = config.name,
                "adopted a running container"
            );
        }
        Ok(())
    }

    async fn list_records(&self) -> Result<Vec<Container>, ProviderError> {
        Ok(self
            .client
            .containers()
            .list(self.client.req(ListContainersRequest { filters: vec![] }))
            .await
            .map_err(|e| status_error("listing containerd containers", e))?
            .into_inner()
            .containers)
    }

    async fn list_tasks(&self) -> Result<HashMap<String, Process>, ProviderError> {
        Ok(self
            .client
            .tasks()
            .list(self.client.req(ListTasksRequest {
                filter: String::new(),
            }))
            .await
            .map_err(|e| status_error("listing containerd tasks", e))?
            .into_inner()
            .tasks
            .into_iter()
            // containerd 1.6 names a listed task's container in `id` (the init process's ID
            // is its container's); later versions fill `container_id` too.
            .map(|t| {
                let key = if t.container_id.is_empty() {
                    t.id.clone()
                } else {
                    t.container_id.clone()
                };
                (key, t)
            })
            .collect())
    }

    /// The state a container record and its task (if any) describe: a recorded exit first
    /// (the task is deleted then), else the task's.
    fn state_of(&self, container: &Container, task: Option<&Process>) -> ContainerState {
        let labels = &container.labels;
        let started_at = labels
            .get(LABEL_STARTED_AT)
            .and_then(|s| time_from_nanos(s));
        let stop_requested = labels.contains_key(LABEL_STOP_REQUESTED);
        if let Some((exit_status, oom)) = exit::recorded_exit(container) {
            let finished_at = labels
                .get(LABEL_FINISHED_AT)
                .and_then(|s| time_from_nanos(s))
                .or(started_at)
                .unwrap_or(SystemTime::UNIX_EPOCH);
            return exited_state(started_at, finished_at, exit_status, oom, stop_requested);
        }
        let Some(task) = task else {
            if let Some(stopped) = labels
                .get(LABEL_STOPPED_AT)
                .and_then(|s| time_from_nanos(s))
            {
                return ContainerState::Exited {
                    started_at,
                    finished_at: stopped,
                    exit_code: SIGKILL_EXIT,
                    reason: ExitReason::Killed,
                    message: Some("stopped before it started".into()),
                };
            }
            return match started_at {
                None => ContainerState::Created,
                // Started, no exit recorded, and its task is gone (its shim died with
                // containerd's state).
                Some(started) => ContainerState::Exited {
                    started_at: Some(started),
                    finished_at: started,
                    exit_code: 255,
                    reason: ExitReason::Error,
                    message: Some("containerd no longer has the container's task".into()),
                },
            };
        };
        match TaskStatus::try_from(task.status).unwrap_or(TaskStatus::Unknown) {
            TaskStatus::Created => ContainerState::Created,
            // Exited, not recorded yet (the reap failed): the task and its cgroup say it.
            TaskStatus::Stopped => exited_state(
                started_at,
                task.exited_at
                    .as_ref()
                    .map_or_else(SystemTime::now, time_from_proto),
                task.exit_status,
                match labels.get(LABEL_OOM) {
                    Some(v) => v == "true",
                    None => {
                        task.exit_status == SIGKILL_EXIT as u32
                            && self.reaper.oom_in_cgroup(&container.id)
                    }
                },
                stop_requested,
            ),
            _ => ContainerState::Running {
                started_at: started_at.unwrap_or(SystemTime::UNIX_EPOCH),
            },
        }
    }

    /// After a stop: the exit recorded and the task deleted now (its shim exits), not left
    /// to the watcher (the agent may be about to exit, as in a node shutdown).
    async fn reap_after_stop(&self, id: &str) {
        if let Err(e) = self.reaper.reap(id).await {
            tracing::warn!(id, error = %e, "recording the exit after a stop failed; retried at the next listing");
        }
    }

    async fn remove_container_inner(&self, id: &str) -> Result<(), ProviderError> {
        if let Some(task) = self.get_task(id).await? {
            if task.status != TaskStatus::Stopped as i32 {
                self.kill(id, libc::SIGKILL as u32, true).await?;
                self.wait_task(id, KILL_WAIT).await?;
            }
            exit::delete_task(&self.client, id).await?;
        }
        match self
            .client
            .containers()
            .delete(
                self.client
                    .req(DeleteContainerRequest { id: id.to_string() }),
            )
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => return Err(status_error(&format!("deleting container {id}"), e)),
        }
        match self
            .client
            .snapshots()
            .remove(self.client.req(RemoveSnapshotRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: id.to_string(),
            }))
            .await
        {
            Ok(_) => {}
            Err(e) if is_not_found(&e) => {}
            Err(e) => {
                tracing::warn!(id, error = %e.message(), "removing the container's snapshot failed; containerd's GC collects it")
            }
        }
        let _ = std::fs::remove_dir_all(self.fifo_dir(id));
        self.streams.forget(id);
        Ok(())
    }

    async fn touch_image(&self, name: &str) {
        let image = containerd_client::services::v1::Image {
            name: name.to_string(),
            labels: HashMap::from([(
                image::LAST_USED_LABEL.to_string(),
                SystemTime::now()
                    .duration_since(SystemTime::UNIX_EPOCH)
                    .map_or(0, |d| d.as_millis())
                    .to_string(),
            )]),
            ..Default::default()
        };
        let result = self
            .client
            .images()
            .update(self.client.req(UpdateImageRequest {
                image: Some(image),
                update_mask: Some(prost_types::FieldMask {
                    paths: vec![format!("labels.{}", image::LAST_USED_LABEL)],
                }),
                ..Default::default()
            }))
            .await;
        if let Err(e) = result {
            tracing::debug!(image = name, error = %e.message(), "recording the image's use failed");
        }
    }
}

/// A container ID the provider made (hex); anything else is not one of ours.
fn valid_id(id: &str) -> Result<(), ProviderError> {
    if id.is_empty() || id.len() > 64 || !id.chars().all(|c| c.is_ascii_hexdigit()) {
        return Err(ProviderError::NotFound(format!("container {id:?}")));
    }
    Ok(())
}

/// An exited container's state from its exit status (128 + the signal for a signal).
fn exited_state(
    started_at: Option<SystemTime>,
    finished_at: SystemTime,
    exit_status: u32,
    oom: bool,
    stop_requested: bool,
) -> ContainerState {
    let exit_code = exit_status as i32;
    let (reason, message) = if oom {
        (
            ExitReason::OomKilled,
            Some("the memory limit was exceeded".into()),
        )
    } else if exit_code == 0 {
        (ExitReason::Completed, None)
    } else if stop_requested {
        (ExitReason::Killed, None)
    } else {
        (ExitReason::Error, None)
    };
    ContainerState::Exited {
        started_at,
        finished_at,
        exit_code: if oom { SIGKILL_EXIT } else { exit_code },
        reason,
        message,
    }
}

fn set_blocking(file: &std::fs::File) -> std::io::Result<()> {
    use std::os::fd::AsRawFd;
    let fd = file.as_raw_fd();
    // SAFETY: fcntl on a descriptor this function's caller owns; no memory is passed.
    let flags = unsafe { libc::fcntl(fd, libc::F_GETFL) };
    if flags < 0 {
        return Err(std::io::Error::last_os_error());
    }
    // SAFETY: as above.
    if unsafe { libc::fcntl(fd, libc::F_SETFL, flags & !libc::O_NONBLOCK) } < 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn mkfifo(path: &Path) -> std::io::Result<()> {
    use std::os::unix::ffi::OsStrExt;
    let c = std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| std::io::Error::other("a NUL in a FIFO path"))?;
    // SAFETY: `c` is a valid NUL-terminated path that lives across the call.
    if unsafe { libc::mkfifo(c.as_ptr(), 0o600) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let tmp = path.with_extension(format!("tmp.{}", random_id()));
    std::fs::write(&tmp, bytes)?;
    std::fs::rename(&tmp, path).inspect_err(|_| {
        let _ = std::fs::remove_file(&tmp);
    })
}

fn load_sandboxes(dir: &Path) -> HashMap<String, Sandbox> {
    let mut out = HashMap::new();
    let Ok(entries) = std::fs::read_dir(dir) else {
        return out;
    };
    for entry in entries.flatten() {
        let path = entry.path();
        if path.extension().is_some_and(|e| e == "json") {
            match std::fs::read(&path)
                .map_err(|e| e.to_string())
                .and_then(|b| serde_json::from_slice::<Sandbox>(&b).map_err(|e| e.to_string()))
            {
                Ok(s) => {
                    out.insert(s.config.pod_uid.clone(), s);
                }
                Err(e) => {
                    tracing::warn!(path = %path.display(), error = e, "unreadable sandbox record; ignored")
                }
            }
        }
    }
    out
}

/// The node's [`ContainerConfig`] stored with the container.
fn stored_config(container: &Container) -> Option<ContainerConfig> {
    let any = container.extensions.get(CONFIG_EXTENSION)?;
    serde_json::from_slice(&any.value).ok()
}

#[async_trait::async_trait]
impl Provider for ContainerdProvider {
    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "containerd".into(),
            version: self.version.clone(),
        }
    }

    fn container_uri(&self, container_id: &str) -> String {
        format!("containerd://{container_id}")
    }

    async fn status(&self) -> RuntimeStatus {
        match self.client.version().version(self.client.req(())).await {
            Ok(_) => RuntimeStatus::Ready,
            Err(e) => RuntimeStatus::NotReady {
                message: format!(
                    "containerd at {} does not answer: {}",
                    self.options.socket.display(),
                    e.message()
                ),
            },
        }
    }

    async fn image_status(&self, reference: &str) -> Option<ImageInfo> {
        let name = image::canonical(reference).ok()?.whole();
        let found = image::get_image(&self.client, &name).await.ok()??;
        Some(ImageInfo {
            reference: reference.to_string(),
            digest: found.target?.digest,
            size: found
                .labels
                .get(image::SIZE_LABEL)
                .and_then(|s| s.parse().ok())
                .unwrap_or(0),
        })
    }

    async fn pull_image(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        let pulled = image::pull(&self.client, &self.options.registries, reference, auth).await?;
        tracing::info!(
            reference,
            name = pulled.name,
            digest = pulled.digest,
            "image pulled"
        );
        Ok(ImageInfo {
            reference: reference.to_string(),
            digest: pulled.digest,
            size: pulled.size,
        })
    }

    /// With the pod network: the pod's namespaces and network made (or, after an agent
    /// restart, found) here. Without it: a record, each container in namespaces of its own.
    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        self.sandbox_path(&config.pod_uid)?;
        let existing = self.sandboxes().get(&config.pod_uid).cloned();
        if let Some(sandbox) = existing {
            if self.network.is_none() || sandbox.namespaces != SandboxNamespaces::default() {
                return Ok(config.pod_uid.clone());
            }
        }
        let Some(network) = &self.network else {
            return self
                .run_pod_sandbox_in(config, SandboxNamespaces::default())
                .await;
        };
        let (namespaces, ips) = network.setup(config).await?;
        tracing::info!(
            pod = config.name,
            pod_uid = config.pod_uid,
            ?ips,
            "pod sandbox ready"
        );
        if let Err(e) = self.record_sandbox(config, namespaces, ips) {
            let _ = network.teardown(&config.pod_uid).await;
            return Err(e);
        }
        Ok(config.pod_uid.clone())
    }

    /// A container pod has a network of its own unless it asks for the host's.
    fn on_node_network(&self, config: &SandboxConfig, _sandbox_id: Option<&str>) -> Option<bool> {
        Some(config.host_network)
    }

    /// Inside the pod's network namespace (its localhost is its own); a hostNetwork pod's is
    /// the node's. Without the pod network each container has a namespace of its own and the
    /// pod has no one localhost: refused.
    async fn pod_connect(
        &self,
        pod_uid: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ProviderError> {
        let network = self
            .sandboxes()
            .get(pod_uid)
            .map(|s| s.namespaces.network.clone())
            .ok_or_else(|| ProviderError::NotFound(format!("pod sandbox {pod_uid}")))?;
        let connected = match &network {
            spec::Namespace::Join(netns) => forward::connect_in(netns, port).await,
            spec::Namespace::Node => forward::connect_on_node(port).await,
            spec::Namespace::Private => {
                return Err(ProviderError::Io(
                    "the pod has no network namespace of its own (the node runs without --pod-cidr): each container has one, port-forward cannot choose".into(),
                ))
            }
        };
        connected.map_err(|e| ProviderError::Io(e.to_string()))
    }

    async fn pod_ips(&self, sandbox_id: &str) -> Vec<std::net::IpAddr> {
        self.sandboxes()
            .get(sandbox_id)
            .map(|s| s.ips.clone())
            .unwrap_or_default()
    }

    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let ids: Vec<String> = self
            .list_records()
            .await?
            .into_iter()
            .filter(|c| c.labels.get(LABEL_POD_UID).is_some_and(|u| u == sandbox_id))
            .map(|c| c.id)
            .collect();
        let stops = ids.iter().map(|id| self.stop_container(id, grace));
        let mut result = Ok(());
        for r in futures::future::join_all(stops).await {
            if r.is_err() && result.is_ok() {
                result = r;
            }
        }
        for id in &ids {
            if let Err(e) = self.remove_container_inner(id).await {
                if result.is_ok() {
                    result = Err(e);
                }
            }
        }
        // On failure the record, the network and the namespaces stay for the next try.
        result?;
        if let Some(network) = &self.network {
            // CNI DEL, then the pinned namespaces go; kept on failure, so a retry does DEL again.
            network.teardown(sandbox_id).await?;
        }
        self.sandboxes().remove(sandbox_id);
        if let Ok(path) = self.sandbox_path(sandbox_id) {
            let _ = std::fs::remove_file(path);
        }
        Ok(())
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        let sandbox = self
            .sandboxes()
            .get(sandbox_id)
            .cloned()
            .ok_or_else(|| ProviderError::NotFound(format!("sandbox {sandbox_id}")))?;
        let resolved = image::resolve(&self.client, &config.image).await?;
        let name = image::canonical(&config.image)?.whole();
        self.touch_image(&name).await;
        let id = random_id();
        let hostname: String = sandbox.config.name.chars().take(63).collect();
        let spec = spec::build(
            &id,
            &hostname,
            &config,
            &resolved.config,
            &sandbox.namespaces,
            &self.cgroups_path(&id),
        )?;
        let config_json = serde_json::to_vec(&config)
            .map_err(|e| ProviderError::Create(format!("encoding the container config: {e}")))?;
        let lease = image::Lease::create(&self.client).await?;
        let made = async {
            self.client
                .snapshots()
                .prepare(self.client.req_leased(
                    PrepareSnapshotRequest {
                        snapshotter: SNAPSHOTTER.into(),
                        key: id.clone(),
                        parent: resolved.top_chain_id.clone(),
                        labels: HashMap::new(),
                    },
                    Some(&lease.id),
                ))
                .await
                .map_err(|e| {
                    status_error(
                        &format!("preparing the root filesystem of {}", config.name),
                        e,
                    )
                })?;
            let labels = HashMap::from([
                (LABEL_POD_UID.to_string(), sandbox_id.to_string()),
                (LABEL_NAME.to_string(), config.name.clone()),
                (LABEL_ATTEMPT.to_string(), config.attempt.to_string()),
                (LABEL_IMAGE_DIGEST.to_string(), resolved.digest.clone()),
            ]);
            let container = Container {
                id: id.clone(),
                labels,
                image: name.clone(),
                runtime: Some(Runtime {
                    name: RUNTIME.into(),
                    options: None,
                }),
                spec: Some(prost_types::Any {
                    type_url: SPEC_TYPE_URL.into(),
                    value: serde_json::to_vec(&spec).unwrap_or_default(),
                }),
                snapshotter: SNAPSHOTTER.into(),
                snapshot_key: id.clone(),
                extensions: HashMap::from([(
                    CONFIG_EXTENSION.to_string(),
                    prost_types::Any {
                        type_url: CONFIG_TYPE_URL.into(),
                        value: config_json,
                    },
                )]),
                ..Default::default()
            };
            self.client
                .containers()
                .create(self.client.req_leased(
                    CreateContainerRequest {
                        container: Some(container),
                    },
                    Some(&lease.id),
                ))
                .await
                .map_err(|e| {
                    ProviderError::Create(format!(
                        "container {}: containerd refused it: {}",
                        config.name,
                        e.message()
                    ))
                })?;
            Ok::<(), ProviderError>(())
        }
        .await;
        lease.delete().await;
        if let Err(e) = made {
            let _ = self.remove_container_inner(&id).await;
            return Err(e);
        }
        tracing::debug!(container = config.name, id, "container created");
        Ok(id)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let container = self.get_container(container_id).await?;
        let config = stored_config(&container).ok_or_else(|| {
            ProviderError::Create(format!("container {container_id} has no stored config"))
        })?;
        // Its task deleted after an exit, a container that ran has a start time (or a recorded
        // exit, if the agent died before writing the start time) instead.
        if self.get_task(container_id).await?.is_some()
            || [LABEL_STOPPED_AT, LABEL_STARTED_AT, LABEL_EXIT_CODE]
                .iter()
                .any(|l| container.labels.contains_key(*l))
        {
            return Err(ProviderError::Create(format!(
                "container {} ({container_id}) is not Created: it cannot be started",
                config.name
            )));
        }
        let rootfs = self
            .client
            .snapshots()
            .mounts(self.client.req(MountsRequest {
                snapshotter: SNAPSHOTTER.into(),
                key: container_id.to_string(),
            }))
            .await
            .map_err(|e| status_error(&format!("the root filesystem of {}", config.name), e))?
            .into_inner()
            .mounts;
        // Opened here in any case: a log the node cannot have (a symbolic link, no directory)
        // is this start's error, not a silent driver's.
        let log = ContainerLog::open(&config.log_path).map_err(|e| {
            ProviderError::Io(format!(
                "container {}: opening log {}: {e}",
                config.name,
                config.log_path.display()
            ))
        })?;
        // The log driver, unless the container reads stdin (a `binary://` log gives it none).
        let driver_uri = match (&self.options.log_driver, config.stdin) {
            (Some(program), false) => {
                Some(log_driver::uri(program, &config.log_path).ok_or_else(|| {
                    ProviderError::Io(format!(
                        "container {}: the log path {} or the log driver {} is not UTF-8",
                        config.name,
                        config.log_path.display(),
                        program.display()
                    ))
                })?)
            }
            _ => None,
        };
        let dir = self.fifo_dir(container_id);
        let _ = std::fs::remove_dir_all(&dir);
        let made = if driver_uri.is_some() {
            std::fs::create_dir_all(&dir)
        } else {
            std::fs::create_dir_all(&dir)
                .and_then(|()| mkfifo(&dir.join("stdout")))
                .and_then(|()| mkfifo(&dir.join("stderr")))
        };
        made.map_err(|e| {
            ProviderError::Io(format!("making the output FIFOs in {}: {e}", dir.display()))
        })?;
        let stdin = if config.stdin {
            let path = dir.join("stdin");
            mkfifo(&path)
                .and_then(|()| self.streams.open_stdin(container_id, &path))
                .map_err(|e| {
                    ProviderError::Io(format!("making the stdin FIFO in {}: {e}", dir.display()))
                })?;
            path.to_string_lossy().into_owned()
        } else {
            String::new()
        };
        let mode = if driver_uri.is_some() {
            "binary"
        } else {
            "fifo"
        };
        // Before the task exists, so an agent restarted at any point knows who reads it.
        self.set_labels(container_id, &[(LABEL_LOG, mode.to_string())])
            .await?;
        let (stdout, stderr) = match driver_uri {
            Some(uri) => (uri.clone(), uri),
            None => {
                self.copy_output(container_id, &log, false)?;
                (
                    dir.join("stdout").to_string_lossy().into_owned(),
                    dir.join("stderr").to_string_lossy().into_owned(),
                )
            }
        };
        drop(log);
        let created = self
            .client
            .tasks()
            .create(self.client.req(CreateTaskRequest {
                container_id: container_id.to_string(),
                rootfs,
                stdin,
                stdout,
                stderr,
                ..Default::default()
            }))
            .await;
        if let Err(e) = created {
            self.release_fifos(container_id);
            return Err(ProviderError::Create(format!(
                "container {}: {}",
                config.name,
                e.message()
            )));
        }
        let started_at = SystemTime::now();
        if let Err(e) = self
            .client
            .tasks()
            .start(self.client.req(StartRequest {
                container_id: container_id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            let _ = self
                .client
                .tasks()
                .delete(self.client.req(DeleteTaskRequest {
                    container_id: container_id.to_string(),
                }))
                .await;
            self.release_fifos(container_id);
            return Err(ProviderError::Create(format!(
                "container {}: {}",
                config.name,
                e.message()
            )));
        }
        self.set_labels(
            container_id,
            &[(LABEL_STARTED_AT, nanos_since_epoch(started_at).to_string())],
        )
        .await?;
        self.watch_exit(container_id);
        tracing::info!(container = config.name, id = container_id, "started");
        Ok(())
    }

    async fn stop_container(
        &self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let container = self.get_container(container_id).await?;
        let Some(task) = self.get_task(container_id).await? else {
            if !container.labels.contains_key(LABEL_STARTED_AT) {
                self.set_labels(
                    container_id,
                    &[(
                        LABEL_STOPPED_AT,
                        nanos_since_epoch(SystemTime::now()).to_string(),
                    )],
                )
                .await?;
            }
            return Ok(());
        };
        if task.status == TaskStatus::Stopped as i32 {
            self.reap_after_stop(container_id).await;
            return Ok(());
        }
        self.set_labels(container_id, &[(LABEL_STOP_REQUESTED, "true".into())])
            .await?;
        self.kill(container_id, libc::SIGTERM as u32, false).await?;
        if self.wait_task(container_id, grace).await? {
            self.reap_after_stop(container_id).await;
            return Ok(());
        }
        tracing::info!(
            id = container_id,
            grace_ms = grace.as_millis() as u64,
            "grace period over; killing"
        );
        self.kill(container_id, libc::SIGKILL as u32, true).await?;
        if !self.wait_task(container_id, KILL_WAIT).await? {
            return Err(ProviderError::Io(format!(
                "container {container_id} did not end within {KILL_WAIT:?} of SIGKILL"
            )));
        }
        self.reap_after_stop(container_id).await;
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError> {
        self.get_container(container_id).await?;
        self.remove_container_inner(container_id).await
    }

    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        let tasks = self.list_tasks().await?;
        let usage = stats::usage(&self.client).await;
        let mut out = Vec::new();
        for container in self.list_records().await? {
            // Containers of this namespace without the provider's labels are not ours.
            let (Some(pod_uid), Some(name)) = (
                container.labels.get(LABEL_POD_UID).cloned(),
                container.labels.get(LABEL_NAME).cloned(),
            ) else {
                continue;
            };
            let mut container = container;
            let mut task = tasks.get(&container.id).cloned();
            // An exit the watcher has not recorded yet (or could not): recorded and its task
            // deleted now, then the record read again.
            if task
                .as_ref()
                .is_some_and(|t| t.status == TaskStatus::Stopped as i32)
            {
                match self.reaper.reap(&container.id).await {
                    Ok(_) => {
                        if let Ok(again) = self.get_container(&container.id).await {
                            container = again;
                        }
                        task = self.get_task(&container.id).await.ok().flatten();
                    }
                    Err(e) => {
                        tracing::warn!(id = container.id, error = %e, "recording an exit failed")
                    }
                }
            }
            let state = self.state_of(&container, task.as_ref());
            let annotations = stored_config(&container)
                .map(|c| c.annotations)
                .unwrap_or_default();
            out.push(ContainerSummary {
                id: container.id.clone(),
                pod_uid,
                name,
                attempt: container
                    .labels
                    .get(LABEL_ATTEMPT)
                    .and_then(|a| a.parse().ok())
                    .unwrap_or(0),
                image_digest: container
                    .labels
                    .get(LABEL_IMAGE_DIGEST)
                    .cloned()
                    .unwrap_or_default(),
                // Running tasks only: an exited container has used nothing now.
                usage: match state {
                    ContainerState::Running { .. } => {
                        usage.get(&container.id).copied().unwrap_or_default()
                    }
                    _ => ContainerUsage::default(),
                },
                state,
                annotations,
            });
        }
        Ok(out)
    }

    async fn exec(
        &self,
        container_id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        self.exec_in(container_id, command, io).await
    }

    async fn attach(&self, container_id: &str, io: AttachIo) -> Result<(), ProviderError> {
        let container = self.get_container(container_id).await?;
        let config = stored_config(&container).ok_or_else(|| {
            ProviderError::NotFound(format!("container {container_id} (no stored config)"))
        })?;
        let running = self
            .get_task(container_id)
            .await?
            .is_some_and(|t| t.status == TaskStatus::Running as i32);
        if !running {
            return Err(ProviderError::Exec(format!(
                "container {} is not running: nothing to attach to",
                config.name
            )));
        }
        let client = self.client.clone();
        let id = container_id.to_string();
        // Resolves when the task has exited (or cannot be waited on: then the output is over
        // once the log is quiet, as after an exit).
        let exited = async move {
            let _ = client
                .tasks()
                .wait(client.req(WaitRequest {
                    container_id: id,
                    exec_id: String::new(),
                }))
                .await;
        };
        self.streams
            .attach(
                &self.client,
                container_id,
                &config.name,
                config.stdin,
                config.stdin_once,
                &config.log_path,
                exited,
                io,
            )
            .await
    }

    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        Ok(self
            .sandboxes()
            .values()
            .map(|s| s.config.clone())
            .collect())
    }

    async fn image_fs(&self) -> Option<provider_api::ImageFsInfo> {
        let path = self.options.image_fs_path.clone()?;
        let used_bytes = self.list_images().await.iter().map(|i| i.size).sum();
        Some(provider_api::ImageFsInfo {
            path,
            used_bytes,
            inodes_used: 0,
        })
    }

    async fn list_images(&self) -> Vec<ImageRecord> {
        let listed = self
            .client
            .images()
            .list(self.client.req(ListImagesRequest { filters: vec![] }))
            .await;
        let images = match listed {
            Ok(reply) => reply.into_inner().images,
            Err(e) => {
                tracing::warn!(error = %e.message(), "listing containerd images failed");
                return Vec::new();
            }
        };
        images
            .into_iter()
            .filter_map(|image| {
                let label = |k: &str| image.labels.get(k).and_then(|v| v.parse::<u64>().ok());
                Some(ImageRecord {
                    size: label(image::SIZE_LABEL).unwrap_or(0),
                    last_used: SystemTime::UNIX_EPOCH
                        + Duration::from_millis(label(image::LAST_USED_LABEL).unwrap_or(0)),
                    digest: image.target.as_ref()?.digest.clone(),
                    reference: image.name,
                })
            })
            .collect()
    }

    async fn remove_image(&self, reference: &str) -> Result<u64, ProviderError> {
        let name = image::canonical(reference)?.whole();
        let found = image::get_image(&self.client, &name)
            .await?
            .ok_or_else(|| ProviderError::NotFound(format!("image {reference}")))?;
        let size = found
            .labels
            .get(image::SIZE_LABEL)
            .and_then(|s| s.parse().ok())
            .unwrap_or(0);
        self.client
            .images()
            .delete(self.client.req(DeleteImageRequest {
                name: name.clone(),
                // Wait for containerd's garbage collection, so the bytes are freed on return.
                sync: true,
                ..Default::default()
            }))
            .await
            .map_err(|e| status_error(&format!("removing image {reference}"), e))?;
        tracing::info!(reference, freed_bytes = size, "image removed");
        Ok(size)
    }
}
