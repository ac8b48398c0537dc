//! The runtime seam of wasm-kubelet.
//!
//! The node (the `wasm-kubelet` crate) owns every piece of Kubernetes state: pods, their
//! lifecycle, restarts, probes and status. A [`Provider`] only executes, CRI-shaped, and speaks in
//! the small types of this crate, never in `k8s_openapi` structs, so a provider can be faked in a
//! unit test and a second backend (containerd) plugs in without touching node logic.
//!
//! Start at [`Provider`]: images ([`Provider::pull_image`]), pod sandboxes
//! ([`Provider::run_pod_sandbox`]) and containers ([`Provider::create_container`],
//! [`Provider::start_container`], [`Provider::stop_container`]), and the listing the node's PLEG
//! relists ([`Provider::list_containers`]).

use std::fmt;
use std::path::PathBuf;
use std::time::{Duration, SystemTime};

/// What a provider runs, reported on the Node as `status.nodeInfo.containerRuntimeVersion`
/// in the CRI's `<name>://<version>` form.
#[derive(Debug, Clone, PartialEq, Eq)]
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
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeStatus {
    /// The runtime works.
    Ready,
    /// The runtime cannot run pods; the message says why, for the Ready condition.
    NotReady { message: String },
}

/// Credentials for one registry, from a pod's `imagePullSecrets` (dockerconfigjson).
#[derive(Clone, PartialEq, Eq)]
pub struct RegistryAuth {
    /// Registry host[:port] the credentials are for, e.g. `127.0.0.1:5443`.
    pub registry: String,
    pub username: String,
    pub password: String,
}

impl fmt::Debug for RegistryAuth {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        // Never print a password, not even in a debug log.
        f.debug_struct("RegistryAuth").field("registry", &self.registry).field("username", &self.username).finish_non_exhaustive()
    }
}

/// An image the provider holds.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ImageInfo {
    /// The reference it was pulled by, e.g. `127.0.0.1:5000/hello:v1`.
    pub reference: String,
    /// The manifest digest, `sha256:<hex>`; reported as the container's imageID.
    pub digest: String,
    /// Bytes on disk.
    pub size: u64,
}

/// Where a pod's sandbox lives; created by the node before any container starts.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct SandboxConfig {
    pub pod_uid: String,
    pub namespace: String,
    pub name: String,
    /// The pod's directory (volumes are materialised below it by the node).
    pub pod_dir: PathBuf,
}

/// A directory made visible to a container (one per volumeMount).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mount {
    /// The directory on the host.
    pub host_path: PathBuf,
    /// Where the container sees it (an absolute guest path).
    pub container_path: String,
    pub read_only: bool,
}

/// Everything a provider needs to create one container. The node has already resolved
/// environment references and `$(VAR)` expansion.
#[derive(Debug, Clone, PartialEq, Eq)]
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
    /// Which run of this container this is (0 first); the node's restart count.
    pub attempt: u32,
}

/// A container's state as the runtime sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ContainerState {
    Created,
    Running { started_at: SystemTime },
    Exited { started_at: Option<SystemTime>, finished_at: SystemTime, exit_code: i32, reason: ExitReason, message: Option<String> },
}

/// Why a container stopped, in the words `status.containerStatuses[].state.terminated.reason` uses.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ExitReason {
    /// Exit code 0.
    Completed,
    /// A non-zero exit or a trap.
    Error,
    /// The memory limit was exceeded; exit code 137.
    OomKilled,
    /// Stopped by [`Provider::stop_container`] (still reported with the kubelet's reasons by the node).
    Killed,
}

impl ExitReason {
    /// The Kubernetes reason string.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::Completed => "Completed",
            Self::Error => "Error",
            Self::OomKilled => "OOMKilled",
            Self::Killed => "Error",
        }
    }
}

/// One container as listed by [`Provider::list_containers`].
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct ContainerSummary {
    pub id: String,
    pub pod_uid: String,
    pub name: String,
    pub attempt: u32,
    pub image_digest: String,
    pub state: ContainerState,
}

/// Errors a provider reports. Each variant says whether retrying can help.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ProviderError {
    /// The runtime could not be set up (bad engine settings, missing host support).
    /// Not retryable: the configuration has to change.
    #[error("runtime setup failed: {0}")]
    Setup(String),
    /// The image could not be pulled (unreachable registry, unknown tag, bad credentials,
    /// digest mismatch). Retryable with backoff (ImagePullBackOff).
    #[error("{0}")]
    Pull(String),
    /// The image is not something this provider runs (not Wasm, no module in it).
    /// Not retryable for this image.
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
}

/// A pod runtime, CRI-shaped: it executes, it does not decide.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Name and version of the runtime behind this provider.
    fn runtime_info(&self) -> RuntimeInfo;

    /// A cheap health check, called every node-status interval.
    async fn status(&self) -> RuntimeStatus;

    /// The image if it is held locally.
    async fn image_status(&self, reference: &str) -> Option<ImageInfo>;

    /// Pulls `reference` (always contacting the registry), verifying digests.
    async fn pull_image(&self, reference: &str, auth: &[RegistryAuth]) -> Result<ImageInfo, ProviderError>;

    /// Creates the pod's sandbox; returns its id. Idempotent per pod UID.
    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError>;

    /// Stops every container of the sandbox (within `grace`) and forgets the sandbox.
    async fn remove_pod_sandbox(&self, sandbox_id: &str, grace: Duration) -> Result<(), ProviderError>;

    /// Creates a container in a sandbox (compiling its module if needed); returns its id.
    async fn create_container(&self, sandbox_id: &str, config: ContainerConfig) -> Result<String, ProviderError>;

    /// Starts a created container.
    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError>;

    /// Asks the container to stop, and ends it forcibly when `grace` runs out.
    async fn stop_container(&self, container_id: &str, grace: Duration) -> Result<(), ProviderError>;

    /// Forgets an exited container.
    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError>;

    /// Every container the provider holds, in every state.
    async fn list_containers(&self) -> Vec<ContainerSummary>;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_info_renders_in_cri_form() {
        let info = RuntimeInfo { name: "wasmtime".into(), version: "48.0.8".into() };
        assert_eq!(info.to_string(), "wasmtime://48.0.8");
    }

    #[test]
    fn registry_auth_debug_hides_the_password() {
        let auth = RegistryAuth { registry: "r".into(), username: "u".into(), password: "hunter2".into() };
        assert!(!format!("{auth:?}").contains("hunter2"));
    }
}
