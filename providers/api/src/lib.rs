//! The runtime seam of wasm-kubelet.
//!
//! The node (the `wasm-kubelet` crate) owns every piece of Kubernetes state: pods, their
//! lifecycle, restarts, probes and status. A [`Provider`] only executes, CRI-shaped, and speaks in
//! the small types of this crate, never in `k8s_openapi` structs, so a provider can be faked in a
//! unit test and a second backend (containerd) plugs in without touching node logic.
//!
//! Start at [`Provider`]: images ([`Provider::pull_image`]), pod sandboxes
//! ([`Provider::run_pod_sandbox`]) and containers ([`Provider::create_container`],
//! [`Provider::start_container`], [`Provider::stop_container`]), the listing the node's PLEG
//! relists ([`Provider::list_containers`]), and exec ([`Provider::exec`] streaming through an
//! [`ExecIo`], [`Provider::exec_sync`] for probes and hooks).

pub mod cri_log;
#[cfg(feature = "fake")]
pub mod fake;
pub mod registries;

#[cfg(feature = "conformance")]
pub mod conformance;

use std::collections::BTreeMap;
use std::fmt;
use std::path::PathBuf;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, SystemTime};

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncRead, AsyncWrite};

/// What a provider runs, reported on the Node as `status.nodeInfo.containerRuntimeVersion`
/// in the CRI's `<name>://<version>` form.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeInfo {
    /// A short lowercase name, e.g. `wasmtime`.
    pub name: String,
    /// The runtime's own version, e.g. `48.0.8`.
    pub version: String,
}

impl fmt::Display for RuntimeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.name, self.version)
    }
}

/// Whether a provider can run pods right now. The node's Ready condition follows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RuntimeStatus {
    /// The runtime works.
    Ready,
    /// The runtime cannot run pods; the message says why, for the Ready condition.
    NotReady { message: String },
}

/// Credentials for one registry, from a pod's `imagePullSecrets` (dockerconfigjson).
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RegistryAuth {
    /// Registry host[:port] the credentials are for, e.g. `127.0.0.1:5443`.
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a password, not even in a debug log.
        f.debug_struct("RegistryAuth")
            .field("registry", &self.registry)
            .field("username", &self.username)
            .finish_non_exhaustive()
    }
}

/// An image the provider holds.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageInfo {
    /// The reference it was pulled by, e.g. `127.0.0.1:5000/hello:v1`.
    pub reference: String,
    /// The manifest digest, `sha256:<hex>`; reported as the container's imageID.
    pub digest: String,
    /// Bytes on disk.
    pub size: u64,
}

/// An image as image garbage collection sees it ([`Provider::list_images`]).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageRecord {
    /// The reference it was pulled by; what [`Provider::remove_image`] takes.
    pub reference: String,
    /// The manifest digest (what [`ContainerSummary::image_digest`] holds for its containers).
    pub digest: String,
    /// Bytes on disk, compiled code included.
    pub size: u64,
    /// When it was last pulled or had a container created from it (kept across restarts).
    pub last_used: SystemTime,
}

/// Where a provider keeps images, and how much they take.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageFsInfo {
    /// A directory on the image filesystem (statvfs of it gives capacity and free space).
    pub path: PathBuf,
    /// Bytes used by images and compiled code.
    pub used_bytes: u64,
    /// Inodes (files) used by them.
    pub inodes_used: u64,
}

/// Where a pod's sandbox lives; created by the node before any container starts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SandboxConfig {
    pub pod_uid: String,
    pub namespace: String,
    pub name: String,
    /// The pod's directory (volumes are materialised below it by the node).
    pub pod_dir: PathBuf,
    /// The handler of the pod's RuntimeClass (`spec.runtimeClassName` resolved by the node);
    /// `None` without one. A node with two providers routes by it.
    #[serde(default)]
    pub runtime_handler: Option<String>,
    /// `spec.hostNetwork`: the pod uses the node's network namespace (and its IP). The Wasm
    /// provider's pods always do; the container provider gives other pods a network of their
    /// own.
    #[serde(default)]
    pub host_network: bool,
}

/// A directory made visible to a container (one per volumeMount).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Mount {
    /// The directory on the host.
    pub host_path: PathBuf,
    /// Where the container sees it (an absolute guest path).
    pub container_path: String,
    pub read_only: bool,
}

/// Everything a provider needs to create one container. The node has already resolved
/// environment references and `$(VAR)` expansion.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerConfig {
    pub name: String,
    /// The image reference the pod names; it must have been pulled.
    pub image: String,
    /// The pod's `command` (replaces the image's entrypoint when not empty).
    pub command: Vec<String>,
    /// The pod's `args` (replaces the image's default arguments when not empty).
    pub args: Vec<String>,
    /// In order; later entries win over earlier ones of the same name.
    pub env: Vec<(String, String)>,
    pub working_dir: Option<String>,
    pub mounts: Vec<Mount>,
    /// The CRI-format log file the container's stdout and stderr go to.
    pub log_path: PathBuf,
    /// `resources.limits.memory`; exceeding it ends the container as OOMKilled.
    pub memory_limit_bytes: Option<u64>,
    /// `resources.limits.cpu` in millicores; the container gets at most this share of a core's
    /// time per 100 ms period, as with CFS quota (`None`: unlimited).
    pub cpu_limit_millicores: Option<u64>,
    /// `resources.requests.cpu` in millicores (the limit when only that is set); under
    /// contention CPU time is shared in proportion to it, as `cpu.shares` does (`None`: the
    /// minimum share).
    pub cpu_request_millicores: Option<u64>,
    /// Which run of this container this is (0 first); the node's restart count.
    pub attempt: u32,
    /// Ports, the pod IP and the outbound policy (see [`ContainerNetwork`]).
    pub network: ContainerNetwork,
    /// `stdin: true`: the container's stdin is a pipe that [`Provider::attach`] writes to
    /// (otherwise it reads end of file at once).
    pub stdin: bool,
    /// `stdinOnce: true`: the pipe closes when the first attached client closes its stdin.
    pub stdin_once: bool,
    /// What the node needs to know about this run when it finds the container again after its
    /// own restart (the spec hash, the termination-message file), as the kubelet keeps in CRI
    /// annotations. The provider stores them and lists them; it never reads them.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// A container's network, in the node's model: the pod IP is the node IP, a container may
/// listen only on its declared ports, and outgoing connections follow the pod's policy. The
/// default (no IP, no ports, any destination) is what a container that declares nothing gets.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerNetwork {
    /// Where the container's ports are served (the node IP); `None`: nowhere.
    pub pod_ip: Option<std::net::IpAddr>,
    /// The container's declared `ports`.
    pub ports: Vec<PortMapping>,
    /// Which destinations outgoing HTTP requests and socket connections may reach.
    pub outbound: OutboundPolicy,
    /// At most this many requests at once per HTTP component container (the rest get 503);
    /// `None`: the provider's default.
    pub max_concurrent_requests: Option<u32>,
}

/// One declared `containerPort`.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PortMapping {
    pub port: u16,
    pub protocol: Protocol,
}

/// A port's protocol (`ports[].protocol`, default TCP).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, Serialize, Deserialize)]
pub enum Protocol {
    Tcp,
    Udp,
    Sctp,
}

/// Which destinations a pod's outgoing connections may reach.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutboundPolicy {
    /// Anywhere (the default when the pod sets no policy).
    #[default]
    AllowAll,
    /// Only these hosts (and ports, where given).
    AllowOnly(Vec<AllowedHost>),
}

/// One allowed destination: a host name or IP address, and a port or any port.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct AllowedHost {
    /// Lower case; an IPv6 address without brackets.
    pub host: String,
    pub port: Option<u16>,
}

impl OutboundPolicy {
    /// Whether `host:port` may be reached (`host` as the guest named it: a name or an address).
    pub fn allows(&self, host: &str, port: u16) -> bool {
        match self {
            OutboundPolicy::AllowAll => true,
            OutboundPolicy::AllowOnly(hosts) => {
                let host = host.trim_start_matches('[').trim_end_matches(']');
                hosts
                    .iter()
                    .any(|h| h.host.eq_ignore_ascii_case(host) && h.port.is_none_or(|p| p == port))
            }
        }
    }
}

/// A container's state as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum ContainerState {
    Created,
    Running {
        started_at: SystemTime,
    },
    Exited {
        started_at: Option<SystemTime>,
        finished_at: SystemTime,
        exit_code: i32,
        reason: ExitReason,
        message: Option<String>,
    },
}

/// Why a container stopped, as the runtime saw it. The node words it for
/// `status.containerStatuses[].state.terminated.reason` (a provider never does).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ExitReason {
    /// Exit code 0.
    Completed,
    /// A non-zero exit or a trap.
    Error,
    /// The memory limit was exceeded; exit code 137.
    OomKilled,
    /// Ended by [`Provider::stop_container`] or a sandbox removal: the grace period ran out
    /// (exit code 137), or the guest ended when asked. Kept apart from [`ExitReason::Error`] so
    /// the node and the provider's own messages (an exec that outlived its container) know the
    /// container was stopped rather than failed.
    Killed,
}

/// What a container has used, measured by the runtime (not estimated).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerUsage {
    /// CPU time spent running the container's instances (and its execs), cumulative.
    pub cpu_nanos: u64,
    /// Memory held now by the container's live instances (linear memories); 0 once exited.
    pub memory_bytes: u64,
}

/// One container as listed by [`Provider::list_containers`].
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ContainerSummary {
    pub id: String,
    pub pod_uid: String,
    pub name: String,
    pub attempt: u32,
    pub image_digest: String,
    pub state: ContainerState,
    pub usage: ContainerUsage,
    /// [`ContainerConfig::annotations`] as the container was created with.
    #[serde(default)]
    pub annotations: BTreeMap<String, String>,
}

/// The streams of one [`Provider::exec`]: where the command's stdin comes from and where its
/// stdout and stderr go, as the guest writes them (never to the container's log file).
pub struct ExecIo {
    /// `None`: the command sees an empty stdin (end of file at once).
    pub stdin: Option<Pin<Box<dyn AsyncRead + Send>>>,
    pub stdout: Pin<Box<dyn AsyncWrite + Send>>,
    pub stderr: Pin<Box<dyn AsyncWrite + Send>>,
    /// `None`: no limit. When it runs out the command is interrupted and the exec is a
    /// [`ProviderError::Timeout`].
    pub timeout: Option<Duration>,
}

impl fmt::Debug for ExecIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("ExecIo")
            .field("stdin", &self.stdin.is_some())
            .field("timeout", &self.timeout)
            .finish_non_exhaustive()
    }
}

/// The streams of one [`Provider::attach`]: the running container's output from now on goes
/// to `stdout`/`stderr` (besides its log file), and `stdin` is copied to the container's stdin.
/// `None`: that stream is not attached.
pub struct AttachIo {
    pub stdin: Option<Pin<Box<dyn AsyncRead + Send>>>,
    pub stdout: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    pub stderr: Option<Pin<Box<dyn AsyncWrite + Send>>>,
}

impl fmt::Debug for AttachIo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("AttachIo")
            .field("stdin", &self.stdin.is_some())
            .field("stdout", &self.stdout.is_some())
            .field("stderr", &self.stderr.is_some())
            .finish()
    }
}

/// How much output [`Provider::exec_sync`] keeps (stdout and stderr together); the rest is read
/// and dropped so the command never blocks on a full pipe. The kubelet's exec prober keeps at
/// most 10 KiB of it, so 16 KiB loses nothing a probe or a hook reports.
pub const EXEC_SYNC_OUTPUT_LIMIT: usize = 16 * 1024;

/// Errors a provider reports. Each variant says whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
pub enum ProviderError {
    /// The runtime could not be set up (bad engine settings, missing host support).
    /// Not retryable: the configuration has to change.
    #[error("runtime setup failed: {0}")]
    Setup(String),
    /// The image could not be pulled for a reason none of the typed pull errors below names
    /// (a digest mismatch, a blob over its limit, a pull that stalled). Retryable with backoff
    /// (ImagePullBackOff).
    #[error("{0}")]
    Pull(String),
    /// The registry has no such image: no such repository or tag (HTTP 404, `MANIFEST_UNKNOWN`,
    /// `NAME_UNKNOWN`). Retryable with backoff: the image may be pushed later.
    #[error("pulling {reference}: not found: {source}")]
    ImageNotFound { reference: String, source: Cause },
    /// The registry refused the credentials, or asked for some and got none (HTTP 401/403,
    /// `UNAUTHORIZED`, `DENIED`): a missing or wrong pull secret. Retryable with backoff: the
    /// secret may be fixed.
    #[error("pulling {reference}: unauthorized (are the image pull secrets right?): {source}")]
    Unauthorized { reference: String, source: Cause },
    /// The registry could not be reached or spoken to: connection refused, a timeout, a TLS
    /// failure. Retryable with backoff.
    #[error("pulling {reference}: the registry is unavailable: {source}")]
    RegistryUnavailable { reference: String, source: Cause },
    /// The image reference cannot be parsed. Not retryable: the pod spec must name another
    /// image (the kubelet's InvalidImageName).
    #[error("{0}")]
    InvalidImageName(String),
    /// The image is not Wasm: its layers and config hold no module or component this provider
    /// runs. Not retryable for this image (the node fails the pod, reason UnsupportedImage).
    #[error("{0}")]
    UnsupportedImage(String),
    /// The image has not been pulled.
    #[error("image {0} is not present")]
    ImageNotPresent(String),
    /// The container could not be created: a module that does not compile, a bad mount.
    /// Not retryable without a change (CreateContainerError).
    #[error("{0}")]
    Create(String),
    /// No such sandbox or container.
    #[error("{0} not found")]
    NotFound(String),
    /// An I/O failure on the host (disk full, permissions). Retryable.
    #[error("{0}")]
    Io(String),
    /// An exec that cannot run as asked: an empty command, a container that is not running.
    /// Not retryable as is (the container may run later).
    #[error("{0}")]
    Exec(String),
    /// An exec ran out of its time and was interrupted. Retryable (a probe counts a failure).
    #[error("{0}")]
    Timeout(String),
    /// The runtime cannot be reached (its process is down or restarting). Retryable: nothing
    /// is known about the runtime's containers until it answers again.
    #[error("container runtime unavailable: {0}")]
    Unavailable(String),
}

/// The underlying failure of a typed [`ProviderError`] (the registry's answer, the transport's
/// error), on one line. A string rather than the original error, so the error crosses the
/// runtime socket and can be cloned for every pull waiting on the same image.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error, Serialize, Deserialize)]
#[error("{0}")]
pub struct Cause(pub String);

impl ProviderError {
    /// The same error with `note` appended to its message (its kind unchanged).
    pub fn with_note(self, note: &str) -> Self {
        use ProviderError::*;
        match self {
            Setup(m) => Setup(m + note),
            Pull(m) => Pull(m + note),
            ImageNotFound { reference, source } => ImageNotFound {
                reference,
                source: Cause(source.0 + note),
            },
            Unauthorized { reference, source } => Unauthorized {
                reference,
                source: Cause(source.0 + note),
            },
            RegistryUnavailable { reference, source } => RegistryUnavailable {
                reference,
                source: Cause(source.0 + note),
            },
            InvalidImageName(m) => InvalidImageName(m + note),
            UnsupportedImage(m) => UnsupportedImage(m + note),
            Create(m) => Create(m + note),
            other => other,
        }
    }
}

impl Cause {
    /// `e` and its sources, on one line ([`one_line`]).
    pub fn of(e: &dyn std::error::Error) -> Self {
        Self(one_line(e))
    }
}

impl From<String> for Cause {
    fn from(s: String) -> Self {
        Self(s)
    }
}

impl From<&str> for Cause {
    fn from(s: &str) -> Self {
        Self(s.to_string())
    }
}

/// An error and its sources on one line, `: `-joined (a source already quoted by its parent is
/// not repeated). The node and the providers both use it for messages users read.
pub fn one_line(e: &dyn std::error::Error) -> String {
    let mut s = e.to_string();
    let mut source = e.source();
    while let Some(cause) = source {
        let text = cause.to_string();
        if !s.contains(&text) {
            s.push_str(": ");
            s.push_str(&text);
        }
        source = cause.source();
    }
    s.replace('\n', " ")
}

/// A pod runtime, CRI-shaped: it executes, it does not decide.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Name and version of the runtime behind this provider.
    fn runtime_info(&self) -> RuntimeInfo;

    /// Every runtime behind this provider (a mixed node's router has two), for the Node's
    /// `containerRuntimeVersion` (joined with commas).
    fn runtimes(&self) -> Vec<RuntimeInfo> {
        vec![self.runtime_info()]
    }

    /// A container's ID as a pod's status shows it, `<runtime>://<id>`.
    fn container_uri(&self, container_id: &str) -> String {
        format!("wasm://{container_id}")
    }

    /// A cheap health check, called every node-status interval.
    async fn status(&self) -> RuntimeStatus;

    /// The image if it is held locally.
    async fn image_status(&self, reference: &str) -> Option<ImageInfo>;

    /// Pulls `reference` (always contacting the registry), verifying digests.
    async fn pull_image(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError>;

    /// Creates the pod's sandbox; returns its id. Idempotent per pod UID.
    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError>;

    /// Stops every container of the sandbox (within `grace`) and forgets the sandbox.
    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError>;

    /// Creates a container in a sandbox (compiling its module if needed); returns its id.
    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, ProviderError>;

    /// Starts a created container.
    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError>;

    /// Asks the container to stop, and ends it forcibly when `grace` runs out.
    async fn stop_container(
        &self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError>;

    /// Forgets an exited container.
    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError>;

    /// Every container the provider holds, in every state. An error means the runtime could
    /// not be asked (never "no containers"): callers skip their pass rather than act on it.
    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError>;

    /// Makes a sandbox that was only recorded (a pod without a RuntimeClass handler) on the side
    /// that runs `image`, so the pod's IPs are known before its first container's environment
    /// is computed (`status.podIP`). Does nothing (the default) where `run_pod_sandbox` made it.
    async fn place_sandbox(&self, sandbox_id: &str, image: &str) -> Result<(), ProviderError> {
        let _ = (sandbox_id, image);
        Ok(())
    }

    /// The sandbox's own IP addresses (podIP first, at most one per family), when the provider
    /// gives pods a network of their own. Empty (the default): the pod's IP is the node's.
    async fn pod_ips(&self, sandbox_id: &str) -> Vec<std::net::IpAddr> {
        let _ = sandbox_id;
        Vec::new()
    }

    /// Whether a sandbox's pod is reached at the node's own addresses, so that each port its
    /// containers declare is a port of the host (claimed at admission, as the kubelet claims
    /// host ports): `Some(true)` for a provider whose pods share the node's network (the Wasm
    /// provider; any `hostNetwork` pod), `Some(false)` for one that gives the pod an IP of its
    /// own, `None` while it cannot say yet (a sandbox a node with two providers routes by its
    /// first image). `sandbox_id` is the sandbox once made.
    fn on_node_network(&self, config: &SandboxConfig, sandbox_id: Option<&str>) -> Option<bool> {
        let _ = (config, sandbox_id);
        Some(true)
    }

    /// Every pod sandbox the provider holds (stats name pods by them); errors as
    /// [`Provider::list_containers`].
    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        Ok(Vec::new())
    }

    /// The image filesystem; `None` when the provider keeps no images on disk.
    async fn image_fs(&self) -> Option<ImageFsInfo> {
        None
    }

    /// Every image held, for image garbage collection.
    async fn list_images(&self) -> Vec<ImageRecord> {
        Vec::new()
    }

    /// Removes the image pulled as `reference` (and its compiled code when no other reference
    /// shares it); returns the bytes freed. Removal is crash-safe: an interrupted one leaves a
    /// store that opens consistent. The node never removes an image a container uses.
    async fn remove_image(&self, reference: &str) -> Result<u64, ProviderError> {
        Err(ProviderError::NotFound(format!(
            "image {reference} (this runtime does not remove images)"
        )))
    }

    /// Runs `command` as a new instance of the container's module in the same sandbox:
    /// same env, same mounts, argv = command. Returns the exit code.
    ///
    /// The exit code means what the container's would: the guest's own code, 1 for a trap (the
    /// trap is one line on `io.stderr`), 137 when the memory limit (the container's) is
    /// exceeded or the container ends first. Errors: [`ProviderError::NotFound`] for an
    /// unknown container, [`ProviderError::Exec`] for an empty command or a container that is
    /// not running, [`ProviderError::Timeout`] when `io.timeout` runs out.
    ///
    /// The default says the provider cannot exec, so a provider (or a test fake) that has no
    /// exec still compiles.
    async fn exec(
        &self,
        container_id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        let _ = (command, io);
        Err(ProviderError::Exec(format!(
            "container {container_id}: this runtime does not support exec"
        )))
    }

    /// Attaches to the running instance of a container (`kubectl attach`): streams what it
    /// writes from now on to `io.stdout`/`io.stderr`, and copies `io.stdin` to its stdin.
    /// Returns when the container ends or the caller stops reading (or, with only stdin
    /// attached, when `io.stdin` ends).
    ///
    /// Errors: [`ProviderError::NotFound`] for an unknown container, [`ProviderError::Exec`]
    /// for a container that is not running, or `io.stdin` for a container created without
    /// [`ContainerConfig::stdin`]. The default says the provider cannot attach.
    async fn attach(&self, container_id: &str, io: AttachIo) -> Result<(), ProviderError> {
        let _ = io;
        Err(ProviderError::Exec(format!(
            "container {container_id}: this runtime does not support attach"
        )))
    }

    /// Where the pod's own TCP listener on `port` is, for port-forward to dial: `Some` only
    /// while one of the pod's containers is itself listening on that declared port (an HTTP
    /// component's server, a socket a guest bound and listens on), never for a port some other
    /// process holds. `None`: the pod is not serving `port`. The default serves nothing.
    async fn pod_listener(&self, pod_uid: &str, port: u16) -> Option<std::net::SocketAddr> {
        let _ = (pod_uid, port);
        None
    }

    /// A TCP connection to `port` on the pod's own localhost, for port-forward: the provider
    /// opens it where the pod's network is (a container pod's network namespace; for a Wasm
    /// pod, whose IP is the node's, only what [`Provider::pod_listener`] names, never a port
    /// another process of the node holds). The default dials [`Provider::pod_listener`].
    ///
    /// Errors (their text ends kubectl's "failed to connect to localhost:<port> inside
    /// namespace ..." line): [`ProviderError::NotFound`] for an unknown pod,
    /// [`ProviderError::Io`] for a port the pod does not serve or a connection that fails.
    async fn pod_connect(
        &self,
        pod_uid: &str,
        port: u16,
    ) -> Result<tokio::net::TcpStream, ProviderError> {
        let Some(addr) = self.pod_listener(pod_uid, port).await else {
            return Err(ProviderError::Io(format!(
                "no container of the pod is serving port {port} (port-forward reaches only a declared containerPort the pod itself listens on)"
            )));
        };
        tokio::net::TcpStream::connect(addr)
            .await
            .map_err(|e| ProviderError::Io(e.to_string()))
    }

    /// [`Provider::exec`] with no stdin, returning the exit code and stdout and stderr
    /// interleaved as written, capped at [`EXEC_SYNC_OUTPUT_LIMIT`] bytes; for exec probes and
    /// exec lifecycle hooks (the CRI's `ExecSync`).
    async fn exec_sync(
        &self,
        container_id: &str,
        command: Vec<String>,
        timeout: Duration,
    ) -> Result<(i32, Vec<u8>), ProviderError> {
        let output = CappedOutput::new(EXEC_SYNC_OUTPUT_LIMIT);
        let io = ExecIo {
            stdin: None,
            stdout: Box::pin(output.clone()),
            stderr: Box::pin(output.clone()),
            timeout: Some(timeout),
        };
        let code = self.exec(container_id, command, io).await?;
        Ok((code, output.take()))
    }
}

/// A writer that keeps the first `limit` bytes written to it (by any of its clones) and
/// accepts and drops the rest.
#[derive(Clone)]
struct CappedOutput {
    inner: Arc<Mutex<Vec<u8>>>,
    limit: usize,
}

impl CappedOutput {
    fn new(limit: usize) -> Self {
        Self {
            inner: Arc::new(Mutex::new(Vec::new())),
            limit,
        }
    }

    fn take(&self) -> Vec<u8> {
        std::mem::take(&mut *self.inner.lock().unwrap_or_else(|e| e.into_inner()))
    }
}

impl AsyncWrite for CappedOutput {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let mut kept = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let room = self.limit.saturating_sub(kept.len());
        kept.extend_from_slice(&buf[..buf.len().min(room)]);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_info_renders_in_cri_form() {
        let info = RuntimeInfo {
            name: "wasmtime".into(),
            version: "48.0.8".into(),
        };
        assert_eq!(info.to_string(), "wasmtime://48.0.8");
    }

    /// Writes what `exec_sync` needs to see: interleaved output past the cap, and an exit code.
    struct Echo;

    #[async_trait::async_trait]
    impl Provider for Echo {
        fn runtime_info(&self) -> RuntimeInfo {
            RuntimeInfo {
                name: "echo".into(),
                version: "0".into(),
            }
        }
        async fn status(&self) -> RuntimeStatus {
            RuntimeStatus::Ready
        }
        async fn image_status(&self, _: &str) -> Option<ImageInfo> {
            None
        }
        async fn pull_image(
            &self,
            reference: &str,
            _: &[RegistryAuth],
        ) -> Result<ImageInfo, ProviderError> {
            Err(ProviderError::Pull(reference.into()))
        }
        async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
            Ok(config.pod_uid.clone())
        }
        async fn remove_pod_sandbox(&self, _: &str, _: Duration) -> Result<(), ProviderError> {
            Ok(())
        }
        async fn create_container(
            &self,
            sandbox_id: &str,
            _: ContainerConfig,
        ) -> Result<String, ProviderError> {
            Err(ProviderError::NotFound(sandbox_id.into()))
        }
        async fn start_container(&self, id: &str) -> Result<(), ProviderError> {
            Err(ProviderError::NotFound(id.into()))
        }
        async fn stop_container(&self, id: &str, _: Duration) -> Result<(), ProviderError> {
            Err(ProviderError::NotFound(id.into()))
        }
        async fn remove_container(&self, id: &str) -> Result<(), ProviderError> {
            Err(ProviderError::NotFound(id.into()))
        }
        async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
            Ok(Vec::new())
        }
        async fn exec(
            &self,
            _: &str,
            command: Vec<String>,
            mut io: ExecIo,
        ) -> Result<i32, ProviderError> {
            use tokio::io::AsyncWriteExt;
            assert!(io.stdin.is_none() && io.timeout == Some(Duration::from_secs(1)));
            io.stdout
                .write_all(b"out ")
                .await
                .map_err(|e| ProviderError::Io(e.to_string()))?;
            io.stderr
                .write_all(b"err ")
                .await
                .map_err(|e| ProviderError::Io(e.to_string()))?;
            io.stdout
                .write_all(&vec![b'x'; EXEC_SYNC_OUTPUT_LIMIT])
                .await
                .map_err(|e| ProviderError::Io(e.to_string()))?;
            Ok(command.len() as i32)
        }
    }

    #[tokio::test]
    async fn exec_sync_interleaves_and_caps_the_output() {
        let (code, output) = Echo
            .exec_sync("c", vec!["a".into(), "b".into()], Duration::from_secs(1))
            .await
            .unwrap();
        assert_eq!(code, 2);
        assert_eq!(output.len(), EXEC_SYNC_OUTPUT_LIMIT);
        assert!(output.starts_with(b"out err xx"));
    }

    #[test]
    fn registry_auth_debug_hides_the_password() {
        let auth = RegistryAuth {
            registry: "r".into(),
            username: "u".into(),
            password: "hunter2".into(),
        };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
