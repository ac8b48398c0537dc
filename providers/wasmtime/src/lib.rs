//! wasm-kubelet's Wasm provider: runs pods with wasmtime and WASI.
//!
//! Start at [`WasmtimeProvider`]: it owns the one `wasmtime::Engine` every pod shares (compiled
//! code is per engine, so sharing it is what lets a second pod of an image skip compilation),
//! and implements [`Provider`]. The pieces, each in its module:
//! - [`image`]: OCI pull of Wasm artifacts, and of ordinary OCI images whose entrypoint is a
//!   module, into a content-addressed, digest-verified store;
//! - [`compile`]: compiled modules/components cached by layer digest, in memory and on disk;
//! - [`instance`]: one run of a container (WASI context, exit mapping);
//! - [`memory`]: the memory budget a container's stores share, and the node's for all guests;
//! - [`exec`]: the container's program run again in its sandbox, stdio to the caller's streams;
//! - `attach`: a client joins a running container's stdout/stderr and (with `stdin: true`) stdin;
//! - [`log`]: the CRI-format container log with the kubelet's rotation;
//! - [`network`]: the pod network policy (the pod's own loopback, link-local and the node's
//!   deny list refused) for sockets, outgoing HTTP and port-forward.
//!
//! Containers live in one map owned by the provider, behind a mutex held only for map access
//! (never across an await); each running container's task reports its exit over a `watch`
//! channel, so readers never wait on a guest.

mod attach;
pub mod compile;
pub mod cpu;
pub mod exec;
pub mod http;
pub mod image;
pub mod instance;
pub mod log;
pub mod memory;
pub mod network;
pub mod sandbox;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, SystemTime};

use provider_api::{
    ContainerConfig, ContainerState, ContainerSummary, ExecIo, ExitReason, ImageInfo, Provider,
    ProviderError, RegistryAuth, RuntimeInfo, RuntimeStatus, SandboxConfig,
};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;
use tracing::Instrument;

use crate::compile::CompileCache;
use crate::image::{ImageStore, PullLimits, RegistryOptions};
use crate::instance::{Exit, Instance, Linkers, KILLED_EXIT_CODE};
use crate::log::ContainerLog;
use crate::sandbox::UsageMeter;

/// The wasmtime version pinned in the workspace (see build.rs).
pub const WASMTIME_VERSION: &str = env!("WASMTIME_VERSION");

/// How often the engine's epoch advances. A running guest checks it at loop heads and function
/// entries: every tick it yields to tokio (so a busy guest cannot starve other tasks for longer
/// than this; a container that requests more CPU yields every few ticks, at most 8, see
/// `cpu::slice_ticks`) and, once stopped, traps. 10 ms bounds the stop latency well under the
/// ~100 ms a kill may take, at the cost of 100 cheap atomic increments a second.
pub const EPOCH_TICK: Duration = Duration::from_millis(10);

/// How long a forced stop may take to show up as an exit before `stop_container` gives up
/// waiting (a guest stuck in a synchronous host call, e.g. a slow disk write).
const KILL_WAIT: Duration = Duration::from_secs(10);

/// What the agent's configuration sets in the provider; the default is what [`WasmtimeProvider::new`] uses.
#[derive(Debug, Clone, Default)]
pub struct ProviderOptions {
    /// Extra registry CAs and plain-http registries for image pulls.
    pub registries: RegistryOptions,
    /// Size caps and the progress deadline of image pulls; the module size cap also bounds
    /// what is compiled.
    pub limits: PullLimits,
    /// Bytes all guests on the node may hold together (the memory the node gives pods, as the
    /// kubelet's `kubepods` cgroup); `None`: no ceiling. See [`memory::NodeMemory`].
    pub node_memory_ceiling: Option<u64>,
    /// `--pod-egress-deny-cidrs` and `--pod-egress-allow-cidrs` (see [`network`]).
    pub pod_egress: network::NodeEgress,
}

/// Runs Wasm pods with wasmtime.
pub struct WasmtimeProvider {
    engine: wasmtime::Engine,
    linkers: Linkers,
    images: ImageStore,
    compiled: CompileCache,
    /// The engine HTTP components run on (pooled instances), made on first use.
    http: http::LazyHttpEngine,
    state: Mutex<State>,
    next_id: AtomicU64,
    /// What every guest on the node holds together; each container's budget charges it.
    node_memory: Arc<memory::NodeMemory>,
    /// The node's pod egress settings, shared by every container's policy.
    egress: Arc<network::NodeEgress>,
}

#[derive(Default)]
struct State {
    sandboxes: HashMap<String, SandboxConfig>,
    containers: HashMap<String, Container>,
    /// Per pod uid: the TCP listeners its containers hold (see [`network::PodListeners`]).
    listeners: HashMap<String, Arc<network::PodListeners>>,
}

struct Container {
    pod_uid: String,
    config: ContainerConfig,
    image_digest: String,
    instance: Instance,
    phase: Phase,
    /// CPU time and memory of the container's instance and execs.
    meter: Arc<UsageMeter>,
    /// Set when the container starts: what `attach` joins.
    attach: Option<Arc<attach::Attachable>>,
    /// What its sockets and outgoing requests may reach, and where its listeners are recorded.
    network: network::NetworkPolicy,
}

/// A container's lifecycle: Created -> Running -> Exited (or Created -> Exited when stopped
/// before it started). Only `start_container` leaves Created.
enum Phase {
    Created,
    /// The run's task holds the sender and publishes the exit once.
    /// `drain` asks for a graceful end (an HTTP component stops accepting and finishes what is
    /// in flight; a command cannot be asked, WASI has no signals); `stop` kills.
    Running {
        started_at: SystemTime,
        exit: watch::Receiver<Option<ContainerState>>,
        stop: CancellationToken,
        drain: CancellationToken,
    },
    Exited(ContainerState),
}

impl Phase {
    fn state(&self) -> ContainerState {
        match self {
            Phase::Created => ContainerState::Created,
            Phase::Running {
                started_at, exit, ..
            } => exit.borrow().clone().unwrap_or(ContainerState::Running {
                started_at: *started_at,
            }),
            Phase::Exited(state) => state.clone(),
        }
    }
}

impl WasmtimeProvider {
    /// An engine with the settings pods need: epoch interruption (so a busy loop can be
    /// stopped) and the component model (so WASI preview2 components run), images and compiled
    /// code under `root_dir`, and a thread advancing the epoch every [`EPOCH_TICK`]; default
    /// [`ProviderOptions`].
    pub fn new(root_dir: PathBuf) -> Result<Self, ProviderError> {
        Self::with_options(root_dir, ProviderOptions::default())
    }

    /// As [`WasmtimeProvider::new`], with `options`.
    pub fn with_options(
        root_dir: PathBuf,
        options: ProviderOptions,
    ) -> Result<Self, ProviderError> {
        let mut config = wasmtime::Config::new();
        config.epoch_interruption(true).wasm_component_model(true);
        let engine =
            wasmtime::Engine::new(&config).map_err(|e| ProviderError::Setup(format!("{e:#}")))?;
        start_epoch_ticker(&engine)?;
        let linkers = Linkers::new(&engine)?;
        let images =
            ImageStore::open(&root_dir, options.registries)?.with_limits(options.limits.clone());
        let compiled = CompileCache::new(engine.clone(), &root_dir)
            .with_max_module_size(options.limits.max_module_size);
        // Compiled code of images removed while the agent was down (or mid-removal) goes too.
        compiled.sweep(
            &images
                .list()
                .iter()
                .filter_map(|(_, i, _)| image::sha256_hex(&i.layer_digest).ok().map(str::to_string))
                .collect(),
        );
        let http = http::LazyHttpEngine::new(&root_dir);
        let node_memory = memory::NodeMemory::new(options.node_memory_ceiling);
        let egress = Arc::new(options.pod_egress);
        Ok(Self {
            engine,
            linkers,
            images,
            compiled,
            http,
            state: Mutex::new(State::default()),
            next_id: AtomicU64::new(1),
            node_memory,
            egress,
        })
    }

    /// What all guests on the node hold together, and their ceiling.
    pub fn node_memory(&self) -> &Arc<memory::NodeMemory> {
        &self.node_memory
    }

    /// The engine shared by every pod.
    pub fn engine(&self) -> &wasmtime::Engine {
        &self.engine
    }

    /// How many times a module or component was compiled (the rest came from the caches).
    pub fn compilations(&self) -> usize {
        self.compiled.compilations()
    }

    /// Stores `wasm` (a module or component) as the image `reference`, as a pull would, without
    /// a registry. For tests and tools (provider-remote's tests run guests written in WAT).
    pub fn import_image(&self, reference: &str, wasm: &[u8]) -> Result<ImageInfo, ProviderError> {
        let image = self.images.import(reference, wasm)?;
        Ok(ImageInfo {
            reference: reference.to_string(),
            digest: image.manifest_digest,
            size: image.size,
        })
    }

    fn state(&self) -> MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|e| e.into_inner())
    }

    fn new_container_id(&self) -> String {
        let nanos = SystemTime::now()
            .duration_since(SystemTime::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        format!("{nanos:x}-{}", self.next_id.fetch_add(1, Ordering::Relaxed))
    }
}

/// Advances the epoch every [`EPOCH_TICK`] on a plain thread (it must tick even when every
/// tokio worker is busy running guests); it ends when the engine is dropped.
pub(crate) fn start_epoch_ticker(engine: &wasmtime::Engine) -> Result<(), ProviderError> {
    let weak = engine.weak();
    std::thread::Builder::new()
        .name("wasmtime-epoch".into())
        .spawn(move || loop {
            std::thread::sleep(EPOCH_TICK);
            match weak.upgrade() {
                Some(engine) => engine.increment_epoch(),
                None => return,
            }
        })
        .map(drop)
        .map_err(|e| ProviderError::Setup(format!("starting the epoch thread: {e}")))
}

/// Waits for the run behind `exit` to publish how it ended.
async fn wait_exit(mut exit: watch::Receiver<Option<ContainerState>>) -> ContainerState {
    loop {
        if let Some(state) = exit.borrow_and_update().clone() {
            return state;
        }
        if exit.changed().await.is_err() {
            // The task ended without publishing: it panicked.
            return exited(
                None,
                Exit {
                    exit_code: 1,
                    reason: ExitReason::Error,
                    message: Some("the instance task ended unexpectedly".into()),
                },
            );
        }
    }
}

fn exited(started_at: Option<SystemTime>, exit: Exit) -> ContainerState {
    ContainerState::Exited {
        started_at,
        finished_at: SystemTime::now(),
        exit_code: exit.exit_code,
        reason: exit.reason,
        message: exit.message,
    }
}

#[async_trait::async_trait]
impl Provider for WasmtimeProvider {
    fn runtime_info(&self) -> RuntimeInfo {
        RuntimeInfo {
            name: "wasmtime".into(),
            version: WASMTIME_VERSION.into(),
        }
    }

    async fn status(&self) -> RuntimeStatus {
        // Compiling and instantiating an empty module exercises the code generator and the
        // instance allocator: if either is broken on this host, no pod could run.
        let engine = self.engine.clone();
        let check = tokio::task::spawn_blocking(move || -> Result<(), String> {
            let module =
                wasmtime::Module::new(&engine, b"\0asm\x01\0\0\0").map_err(|e| format!("{e:#}"))?;
            drop(module);
            Ok(())
        })
        .await;
        match check {
            Ok(Ok(())) => RuntimeStatus::Ready,
            Ok(Err(message)) => RuntimeStatus::NotReady {
                message: format!("wasmtime cannot compile modules: {message}"),
            },
            Err(e) => RuntimeStatus::NotReady {
                message: format!("wasmtime health check failed: {e}"),
            },
        }
    }

    async fn image_status(&self, reference: &str) -> Option<ImageInfo> {
        self.images.get(reference).map(|image| ImageInfo {
            reference: reference.to_string(),
            digest: image.manifest_digest,
            size: image.size,
        })
    }

    async fn pull_image(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        let pulled = self
            .images
            .pull(reference, auth)
            .instrument(tracing::info_span!("pull", image = reference))
            .await;
        if pulled.is_ok() {
            self.images.touch(reference);
        }
        pulled
    }

    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        self.state()
            .sandboxes
            .insert(config.pod_uid.clone(), config.clone());
        tracing::debug!(pod = %format!("{}/{}", config.namespace, config.name), uid = %config.pod_uid, "sandbox ready");
        Ok(config.pod_uid.clone())
    }

    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let ids: Vec<String> = self
            .state()
            .containers
            .iter()
            .filter(|(_, c)| c.pod_uid == sandbox_id)
            .map(|(id, _)| id.clone())
            .collect();
        let stops = ids.iter().map(|id| self.stop_container(id, grace));
        let results = futures::future::join_all(stops).await;
        let mut state = self.state();
        for id in &ids {
            state.containers.remove(id);
        }
        state.sandboxes.remove(sandbox_id);
        state.listeners.remove(sandbox_id);
        drop(state);
        results.into_iter().find(|r| r.is_err()).unwrap_or(Ok(()))
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        mut config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        if !self.state().sandboxes.contains_key(sandbox_id) {
            return Err(ProviderError::NotFound(format!("sandbox {sandbox_id}")));
        }
        let image = self
            .images
            .get(&config.image)
            .ok_or_else(|| ProviderError::ImageNotPresent(config.image.clone()))?;
        self.images.touch(&config.image);
        // An ordinary OCI image's Entrypoint and Cmd are the argv defaults.
        (config.command, config.args) = image::with_image_defaults(
            &image,
            std::mem::take(&mut config.command),
            std::mem::take(&mut config.args),
        );
        for mount in &config.mounts {
            if !mount.host_path.is_dir() {
                return Err(ProviderError::Create(format!(
                    "container {}: mount {} at {} is not a directory",
                    config.name,
                    mount.host_path.display(),
                    mount.container_path
                )));
            }
        }
        let wasm = self
            .images
            .blob_path(&image.layer_digest)
            .map_err(|e| ProviderError::Create(format!("image {}: {e}", config.image)))?;
        let program = self
            .compiled
            .get(&image.layer_digest, &wasm)
            .await
            .map_err(|e| {
                ProviderError::Create(format!(
                    "container {} (image {}): {e}",
                    config.name, config.image
                ))
            })?;
        let instance = Instance::prepare(&self.linkers, &program).map_err(|e| {
            ProviderError::Create(format!(
                "container {} (image {}): {e}",
                config.name, config.image
            ))
        })?;
        let instance = match instance {
            // An HTTP component runs on the HTTP engine (pooled instances), compiled for it.
            Instance::Http(_) => Instance::Http(
                self.http
                    .prepare(&image.layer_digest, &wasm)
                    .await
                    .map_err(|e| {
                        ProviderError::Create(format!(
                            "container {} (image {}): {e}",
                            config.name, config.image
                        ))
                    })?,
            ),
            other => other,
        };
        let id = self.new_container_id();
        let mut state = self.state();
        if !state.sandboxes.contains_key(sandbox_id) {
            return Err(ProviderError::NotFound(format!(
                "sandbox {sandbox_id} (removed while creating)"
            )));
        }
        tracing::debug!(container = %config.name, id, "container created");
        // One budget for everything the container's guests allocate: its instance, execs,
        // probes, hooks and HTTP requests all charge it (see `memory`).
        let budget = memory::MemoryBudget::new(config.memory_limit_bytes, self.node_memory.clone());
        let meter = Arc::new(
            UsageMeter::with_cpu_limit(config.cpu_limit_millicores)
                .with_cpu_request(config.cpu_request_millicores)
                .with_memory(budget),
        );
        let listeners = state
            .listeners
            .entry(sandbox_id.to_string())
            .or_default()
            .clone();
        let network = network::NetworkPolicy::new(
            config.network.clone(),
            self.egress.clone(),
            listeners,
            &id,
        );
        state.containers.insert(
            id.clone(),
            Container {
                pod_uid: sandbox_id.to_string(),
                config,
                image_digest: image.manifest_digest,
                instance,
                phase: Phase::Created,
                meter,
                attach: None,
                network,
            },
        );
        Ok(id)
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let mut state = self.state();
        let container = state
            .containers
            .get_mut(container_id)
            .ok_or_else(|| ProviderError::NotFound(format!("container {container_id}")))?;
        if !matches!(container.phase, Phase::Created) {
            return Err(ProviderError::Create(format!(
                "container {} ({container_id}) is {:?}, not Created: it cannot be started",
                container.config.name,
                kind(&container.phase.state())
            )));
        }
        let config = &container.config;
        let log = ContainerLog::open(&config.log_path).map_err(|e| {
            ProviderError::Io(format!(
                "container {}: opening log {}: {e}",
                config.name,
                config.log_path.display()
            ))
        })?;
        let mut wasi = instance::wasi_context(config, &container.network, &log)
            .map_err(|e| ProviderError::Create(format!("container {}: {e}", config.name)))?;
        // An HTTP component's requests each get their own empty stdin: nothing would read the pipe.
        let stdin = config.stdin && !matches!(container.instance, Instance::Http(_));
        let attachable = Arc::new(attach::Attachable::new(
            &config.name,
            stdin,
            config.stdin_once,
            &log,
            &mut wasi,
        ));
        // An HTTP component's ports are bound before it counts as started.
        let listeners = match &container.instance {
            Instance::Http(_) => Some(
                http::bind(&config.network, &container.network).map_err(|e| {
                    ProviderError::Create(format!("container {}: {e}", config.name))
                })?,
            ),
            _ => None,
        };
        let (drain, http_config, network) = (
            CancellationToken::new(),
            config.clone(),
            container.network.clone(),
        );
        let started_at = SystemTime::now();
        let stop = CancellationToken::new();
        let (tx, rx) = watch::channel(None);
        let span = tracing::info_span!("container", pod = %container.pod_uid, name = %config.name, id = container_id);
        let (engine, instance, token, meter) = (
            self.engine.clone(),
            container.instance.clone(),
            stop.clone(),
            container.meter.clone(),
        );
        container.phase = Phase::Running {
            started_at,
            exit: rx,
            stop,
            drain: drain.clone(),
        };
        container.attach = Some(attachable);
        drop(state);
        tokio::spawn(
            async move {
                tracing::info!("started");
                let exit = match (&instance, listeners) {
                    (Instance::Http(pre), Some(listeners)) => {
                        http::serve(
                            pre.clone(),
                            http_config,
                            network.clone(),
                            listeners,
                            log.clone(),
                            meter.clone(),
                            drain,
                            token.clone(),
                        )
                        .await
                    }
                    _ => instance.run(&engine, wasi, token.clone(), &meter).await,
                };
                // The container's end ends its execs, as a pid namespace's end does, and closes
                // its sockets: none of its listeners is the pod's any more.
                token.cancel();
                network.forget_listeners();
                log.finish();
                tracing::info!(
                    exit_code = exit.exit_code,
                    reason = exit.reason.as_str(),
                    message = exit.message.as_deref().unwrap_or(""),
                    "exited"
                );
                let _ = tx.send(Some(exited(Some(started_at), exit)));
            }
            .instrument(span),
        );
        Ok(())
    }

    async fn stop_container(
        &self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        let (exit, stop) = {
            let mut state = self.state();
            let container = state
                .containers
                .get_mut(container_id)
                .ok_or_else(|| ProviderError::NotFound(format!("container {container_id}")))?;
            match &container.phase {
                Phase::Created => {
                    let exit = Exit {
                        exit_code: KILLED_EXIT_CODE,
                        reason: ExitReason::Killed,
                        message: Some("stopped before it started".into()),
                    };
                    container.phase = Phase::Exited(exited(None, exit));
                    return Ok(());
                }
                Phase::Exited(_) => return Ok(()),
                Phase::Running {
                    exit, stop, drain, ..
                } => {
                    drain.cancel();
                    (exit.clone(), stop.clone())
                }
            }
        };
        // WASI has no signals: "cooperative" is the grace period to finish on its own.
        if tokio::time::timeout(grace, wait_exit(exit.clone()))
            .await
            .is_err()
        {
            tracing::info!(
                id = container_id,
                grace_ms = grace.as_millis() as u64,
                "grace period over; killing"
            );
            stop.cancel();
            if tokio::time::timeout(KILL_WAIT, wait_exit(exit))
                .await
                .is_err()
            {
                return Err(ProviderError::Io(format!(
                    "container {container_id} did not end within {KILL_WAIT:?} of being killed"
                )));
            }
        }
        Ok(())
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError> {
        let running = match self.state().containers.get(container_id) {
            None => return Err(ProviderError::NotFound(format!("container {container_id}"))),
            Some(c) => matches!(c.phase.state(), ContainerState::Running { .. }),
        };
        if running {
            self.stop_container(container_id, Duration::ZERO).await?;
        }
        self.state().containers.remove(container_id);
        Ok(())
    }

    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        Ok(self
            .state()
            .containers
            .iter()
            .map(|(id, c)| ContainerSummary {
                id: id.clone(),
                pod_uid: c.pod_uid.clone(),
                name: c.config.name.clone(),
                attempt: c.config.attempt,
                image_digest: c.image_digest.clone(),
                state: c.phase.state(),
                usage: c.meter.usage(),
                annotations: c.config.annotations.clone(),
            })
            .collect())
    }

    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        Ok(self.state().sandboxes.values().cloned().collect())
    }

    async fn image_fs(&self) -> Option<provider_api::ImageFsInfo> {
        let (images, compiled) = (
            self.images.dir().to_path_buf(),
            self.compiled.dir().to_path_buf(),
        );
        let usage = tokio::task::spawn_blocking(move || {
            let (a, b) = (image::tree_usage(&images), image::tree_usage(&compiled));
            (a.0 + b.0, a.1 + b.1)
        })
        .await
        .unwrap_or_default();
        Some(provider_api::ImageFsInfo {
            path: self.images.dir().to_path_buf(),
            used_bytes: usage.0,
            inodes_used: usage.1,
        })
    }

    async fn list_images(&self) -> Vec<provider_api::ImageRecord> {
        self.images
            .list()
            .into_iter()
            .map(|(reference, image, used)| {
                let compiled = image::sha256_hex(&image.layer_digest)
                    .ok()
                    .and_then(|hex| {
                        std::fs::metadata(self.compiled.dir().join(format!("{hex}.cwasm"))).ok()
                    })
                    .map_or(0, |m| m.len());
                provider_api::ImageRecord {
                    reference,
                    digest: image.manifest_digest,
                    size: image.size + compiled,
                    last_used: SystemTime::UNIX_EPOCH + Duration::from_millis(used),
                }
            })
            .collect()
    }

    async fn remove_image(&self, reference: &str) -> Result<u64, ProviderError> {
        let (layer, freed) = self.images.remove(reference)?;
        let compiled = layer.map_or(0, |digest| {
            self.compiled
                .remove(&digest, |path| self.images.discard(path))
        });
        tracing::info!(reference, freed_bytes = freed + compiled, "image removed");
        Ok(freed + compiled)
    }

    async fn attach(
        &self,
        container_id: &str,
        io: provider_api::AttachIo,
    ) -> Result<(), ProviderError> {
        let (attachable, exit) = {
            let state = self.state();
            let container = state
                .containers
                .get(container_id)
                .ok_or_else(|| ProviderError::NotFound(format!("container {container_id}")))?;
            match (&container.phase, container.phase.state(), &container.attach) {
                (Phase::Running { exit, .. }, ContainerState::Running { .. }, Some(attachable)) => {
                    (attachable.clone(), exit.clone())
                }
                (_, other, _) => {
                    return Err(ProviderError::Exec(format!(
                        "container {} ({container_id}) is {}, not Running: cannot attach to it",
                        container.config.name,
                        kind(&other)
                    )))
                }
            }
        };
        attachable.attach(io, exit).await
    }

    async fn pod_listener(&self, pod_uid: &str, port: u16) -> Option<std::net::SocketAddr> {
        let listeners = self.state().listeners.get(pod_uid).cloned()?;
        listeners.dial(port)
    }

    async fn exec(
        &self,
        container_id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        let (pod_uid, config, network, instance, stop, meter) = {
            let state = self.state();
            let container = state
                .containers
                .get(container_id)
                .ok_or_else(|| ProviderError::NotFound(format!("container {container_id}")))?;
            match (&container.phase, container.phase.state()) {
                (Phase::Running { stop, .. }, ContainerState::Running { .. }) => (
                    container.pod_uid.clone(),
                    container.config.clone(),
                    container.network.clone(),
                    container.instance.clone(),
                    stop.clone(),
                    container.meter.clone(),
                ),
                (_, other) => {
                    return Err(ProviderError::Exec(format!(
                        "container {} ({container_id}) is {}, not Running: cannot exec into it",
                        container.config.name,
                        kind(&other)
                    )))
                }
            }
        };
        let program = command.first().map(String::as_str).unwrap_or("");
        let span = tracing::debug_span!("exec", pod = %pod_uid, name = %config.name, id = container_id, command = program);
        exec::run(
            &self.engine,
            &instance,
            &config,
            &network,
            command,
            io,
            &stop,
            &meter,
        )
        .instrument(span)
        .await
    }
}

fn kind(state: &ContainerState) -> &'static str {
    match state {
        ContainerState::Created => "Created",
        ContainerState::Running { .. } => "Running",
        ContainerState::Exited { .. } => "Exited",
    }
}

#[cfg(test)]
mod tests;
