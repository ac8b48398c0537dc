//! Flags and the `--config` file, merged and checked into one [`Config`] before anything starts.
//!
//! Names and defaults follow the kubelet. Precedence, as in the kubelet: a flag given on the
//! command line beats the KubeletConfiguration file, which beats the default. Every problem is
//! one [`ConfigError`] whose `Display` is a single line naming the flag or field at fault.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use clap::Parser;
use serde::Deserialize;

// Defaults, each the kubelet's own unless said otherwise. Defined here and nowhere else.
/// Kept apart from the kubelet's /var/lib/kubelet so both can run on one host.
pub const DEFAULT_ROOT_DIR: &str = "/var/lib/wasm-kubelet";
/// Where the kubelet writes container logs; log collectors look here.
const DEFAULT_POD_LOGS_DIR: &str = "/var/log/pods";
const DEFAULT_NODE_STATUS_UPDATE_FREQUENCY: Duration = Duration::from_secs(10);
/// The kubelet reports unchanged status at least this often (nodeStatusReportFrequency).
const DEFAULT_NODE_STATUS_REPORT_FREQUENCY: Duration = Duration::from_secs(5 * 60);
const DEFAULT_FILE_CHECK_FREQUENCY: Duration = Duration::from_secs(20);
const DEFAULT_HTTP_CHECK_FREQUENCY: Duration = Duration::from_secs(20);
/// The kubelet's syncFrequency: how often volumes of running pods are set up again.
const DEFAULT_SYNC_FREQUENCY: Duration = Duration::from_secs(60);
const DEFAULT_HOUSEKEEPING_INTERVAL: Duration = Duration::from_secs(10);
/// The kubelet's 1m, defined beside the pull it bounds (as are --max-module-size's and
/// --max-layer-uncompressed-size's defaults).
const DEFAULT_IMAGE_PULL_PROGRESS_DEADLINE: Duration = provider_wasmtime::image::DEFAULT_PULL_PROGRESS_DEADLINE;
const DEFAULT_PORT: u16 = 10250;
const DEFAULT_HEALTHZ_PORT: u16 = 10248;
/// The kubelet API listens on every address, as the kubelet's `address` default.
const DEFAULT_ADDRESS: IpAddr = IpAddr::V4(std::net::Ipv4Addr::UNSPECIFIED);
/// The kubelet's default is true; see `--anonymous-auth` for why this agent refuses by default.
const DEFAULT_ANONYMOUS_AUTH: bool = false;
const DEFAULT_MAX_PODS: u32 = 110;
const DEFAULT_IMAGE_GC_HIGH: u8 = 85;
const DEFAULT_IMAGE_GC_LOW: u8 = 80;
const DEFAULT_EVICTION_PRESSURE_TRANSITION_PERIOD: Duration = Duration::from_secs(5 * 60);
const DEFAULT_MINIMUM_IMAGE_TTL: Duration = Duration::from_secs(2 * 60);
const DEFAULT_MAXIMUM_DEAD_CONTAINERS_PER_CONTAINER: i32 = 1;
const DEFAULT_MAXIMUM_DEAD_CONTAINERS: i32 = -1;
/// The kubelet's fixed ImageGCPeriod and ContainerGCPeriod.
const DEFAULT_IMAGE_GC_PERIOD: Duration = Duration::from_secs(5 * 60);
const DEFAULT_CONTAINER_GC_PERIOD: Duration = Duration::from_secs(60);
/// The kubelet's hard eviction defaults on Linux.
const DEFAULT_EVICTION_HARD: &str = "memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,imagefs.available<15%";
/// The lease the node renews; the kubelet's nodeLeaseDurationSeconds default.
const DEFAULT_NODE_LEASE_DURATION: Duration = Duration::from_secs(40);
/// An exec/attach/port-forward session with no traffic for this long is closed: the kubelet's
/// streamingConnectionIdleTimeout default.
const DEFAULT_STREAMING_CONNECTION_IDLE_TIMEOUT: Duration = Duration::from_secs(4 * 60 * 60);

/// A problem with the flags, the config file or the kubeconfig. Never retryable: the user has
/// to change what they gave. `Display` is one line.
#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    /// Not a problem: `--help` or `--version` was asked for; this is the text to print.
    #[error("{0}")]
    HelpRequested(String),
    /// A command-line problem clap found (unknown flag, missing value).
    #[error("{0}")]
    Usage(String),
    /// A flag (or config field) with a value we cannot use.
    #[error("invalid value {value:?} for {flag}: {reason}")]
    InvalidValue { flag: &'static str, value: String, reason: String },
    /// A flag the kubelet has that this agent refuses, and why.
    #[error("{flag} is not supported: {reason}")]
    Unsupported { flag: &'static str, reason: String },
    /// The `--config` file cannot be read or parsed.
    #[error("config file {path}: {reason}")]
    ConfigFile { path: PathBuf, reason: String },
    /// The kubeconfig cannot be read or parsed.
    #[error("kubeconfig {path}: {reason}")]
    Kubeconfig { path: PathBuf, reason: String },
}

/// The command line. Every field is optional so the merge can tell "given" from "default".
#[derive(Debug, Default, Parser)]
#[command(name = "wasm-kubelet", version, about = "A kubelet for WebAssembly workloads.")]
pub struct Flags {
    /// kubeconfig with the node's credentials; without it the agent runs standalone.
    #[arg(long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig used to request a client certificate when --kubeconfig does not exist yet.
    #[arg(long, value_name = "PATH")]
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// Directory for TLS certificates (default <root-dir>/pki).
    #[arg(long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Rotate the client certificate before it expires, by CSR with the current identity
    /// (KubeletConfiguration rotateCertificates) [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub rotate_certificates: Option<String>,
    /// Get the kubelet API's serving certificate by CSR (kubernetes.io/kubelet-serving) and
    /// renew it; self-signed until one is approved (KubeletConfiguration serverTLSBootstrap)
    /// [default: false].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub rotate_server_certificates: Option<String>,
    /// A KubeletConfiguration (kubelet.config.k8s.io/v1beta1) YAML file; flags override it.
    #[arg(long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// Use this name for the node instead of the hostname.
    #[arg(long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// The node's IP address (its InternalIP and every pod's IP).
    #[arg(long, value_name = "IP")]
    pub node_ip: Option<String>,
    /// Set as the Node's spec.providerID.
    #[arg(long, value_name = "ID")]
    pub provider_id: Option<String>,
    /// Register the node with the API server [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub register_node: Option<String>,
    /// Taints to register with: key=value:Effect,...
    #[arg(long, value_name = "TAINTS")]
    pub register_with_taints: Option<String>,
    /// Labels to add at registration: key=value,...
    #[arg(long, value_name = "LABELS")]
    pub node_labels: Option<String>,
    /// How often the node status is computed and, if changed, posted [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub node_status_update_frequency: Option<String>,
    /// The agent's state directory [default: /var/lib/wasm-kubelet].
    #[arg(long, value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// Where container logs go, as `<dir>/<ns>_<pod>_<uid>/<container>/<n>.log` (the
    /// KubeletConfiguration field podLogsDir) [default: /var/log/pods].
    #[arg(long, value_name = "DIR")]
    pub pod_logs_dir: Option<PathBuf>,
    /// Directory of static pod manifests.
    #[arg(long, value_name = "DIR")]
    pub pod_manifest_path: Option<PathBuf>,
    /// URL serving static pod manifests.
    #[arg(long, value_name = "URL")]
    pub manifest_url: Option<String>,
    /// A header sent with every --manifest-url request, `Key:Value`; repeatable.
    #[arg(long, value_name = "KEY:VALUE")]
    pub manifest_url_header: Vec<String>,
    /// How often the static pod directory is rescanned [default: 20s].
    #[arg(long, value_name = "DURATION")]
    pub file_check_frequency: Option<String>,
    /// How often the manifest URL is fetched [default: 20s].
    #[arg(long, value_name = "DURATION")]
    pub http_check_frequency: Option<String>,
    /// How often running pods' configMap, secret, downwardAPI and projected volumes are
    /// refreshed [default: 1m].
    #[arg(long, value_name = "DURATION")]
    pub sync_frequency: Option<String>,
    /// Run the static pods once, then exit.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub runonce: Option<String>,
    /// Where the Wasm guests run: `spawn` (a runtime process apart from the agent, started by
    /// the agent when none answers on --wasm-runtime-endpoint; it outlives agent restarts),
    /// `external` (such a process started by the host, e.g. its own systemd unit; the agent
    /// waits for it) or `in-agent` (inside the agent: every agent restart stops every pod;
    /// what --runonce uses) (wasm-kubelet's own flag) [default: spawn].
    #[arg(long, value_name = "MODE")]
    pub wasm_runtime: Option<String>,
    /// The Unix socket the Wasm runtime serves the agent on [default: <root-dir>/runtime/wasm-runtime.sock].
    #[arg(long, value_name = "PATH")]
    pub wasm_runtime_endpoint: Option<PathBuf>,
    /// Serve the kubelet API [default: true].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub enable_server: Option<String>,
    /// Port of the kubelet API, published on the Node [default: 10250].
    #[arg(long, value_name = "PORT")]
    pub port: Option<String>,
    /// Port of the plain /healthz endpoint on loopback; 0 disables it [default: 10248].
    #[arg(long, value_name = "PORT")]
    pub healthz_port: Option<String>,
    /// IP address the kubelet API listens on (0.0.0.0 or :: for every address) [default: 0.0.0.0].
    #[arg(long, value_name = "IP")]
    pub address: Option<String>,
    /// PEM serving certificate (and chain) for the kubelet API; without it a self-signed one is
    /// made, or reused, in --cert-dir as kubelet.crt/kubelet.key.
    #[arg(long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,
    /// PEM CA bundle: client certificates signed by it authenticate to the kubelet API as their
    /// CN (user) and O (groups).
    #[arg(long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,
    /// Serve unauthenticated kubelet API requests as system:anonymous [default: false]. The
    /// kubelet defaults to true and relies on deployers to turn it off; this agent refuses them
    /// (401) unless asked, because its API reads container logs and will run commands.
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub anonymous_auth: Option<String>,
    /// Authenticate bearer tokens on the kubelet API with TokenReview [default: true with a
    /// --kubeconfig; standalone has no API server to ask].
    #[arg(long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true")]
    pub authentication_token_webhook: Option<String>,
    /// How kubelet API requests are authorized: Webhook (SubjectAccessReview) or AlwaysAllow
    /// [default: Webhook with a --kubeconfig, AlwaysAllow standalone].
    #[arg(long, value_name = "MODE")]
    pub authorization_mode: Option<String>,
    /// How often node resources are measured [default: 10s].
    #[arg(long, value_name = "DURATION")]
    pub housekeeping_interval: Option<String>,
    /// Cancel an image pull that makes no progress for this long [default: 1m].
    #[arg(long, value_name = "DURATION")]
    pub image_pull_progress_deadline: Option<String>,
    /// Close an exec, attach or port-forward session after this long without traffic in either
    /// direction; 0 never closes one (KubeletConfiguration streamingConnectionIdleTimeout)
    /// [default: 4h].
    #[arg(long, value_name = "DURATION")]
    pub streaming_connection_idle_timeout: Option<String>,
    /// PEM bundle of extra CA certificates trusted for image registries' TLS, besides the
    /// built-in web PKI roots (wasm-kubelet's own flag: the kubelet leaves this to the runtime).
    #[arg(long, value_name = "PATH")]
    pub registry_ca_file: Option<PathBuf>,
    /// Registries (host[:port], comma-separated) that may be spoken to over plain http when
    /// https fails; no other registry ever is, loopback ones included (wasm-kubelet's own flag:
    /// the kubelet leaves this to the runtime) [default: none].
    #[arg(long, value_name = "HOSTS")]
    pub insecure_registries: Option<String>,
    /// The largest Wasm module an image may hold (a quantity, e.g. 256Mi); a larger one is
    /// refused before it is downloaded and never compiled [default: 256Mi].
    #[arg(long, value_name = "QUANTITY")]
    pub max_module_size: Option<String>,
    /// The most one tar layer of an ordinary OCI image may inflate to while the module is
    /// searched for in it (decompression bombs) [default: 1Gi].
    #[arg(long, value_name = "QUANTITY")]
    pub max_layer_uncompressed_size: Option<String>,
    /// Comma-separated CIDRs (or addresses) no pod may reach, by socket or outgoing HTTP, e.g.
    /// the API server's etcd or the node's own daemons (wasm-kubelet's own flag;
    /// KubeletConfiguration podEgressDenyCIDRs) [default: none]. Link-local and the node's
    /// loopback outside the pod's own ports are refused whatever this says.
    #[arg(long, value_name = "CIDRS")]
    pub pod_egress_deny_cidrs: Option<String>,
    /// Comma-separated CIDRs of link-local or loopback addresses pods may reach all the same,
    /// e.g. NodeLocal DNSCache's 169.254.20.10 or a node-local proxy (wasm-kubelet's own flag;
    /// KubeletConfiguration podEgressAllowCIDRs) [default: none]. The deny list and the pod's
    /// allowed-outbound-hosts still apply.
    #[arg(long, value_name = "CIDRS")]
    pub pod_egress_allow_cidrs: Option<String>,
    /// Most pods this node runs; its pods capacity [default: 110].
    #[arg(long, value_name = "N")]
    pub max_pods: Option<String>,
    /// Resources kept for the OS and system daemons, taken from allocatable:
    /// cpu=100m,memory=1Gi,ephemeral-storage=1Gi,pid=1000 [default: none].
    #[arg(long, value_name = "RESOURCES")]
    pub system_reserved: Option<String>,
    /// Resources kept for Kubernetes daemons (this agent), taken from allocatable; same form
    /// as --system-reserved [default: none].
    #[arg(long, value_name = "RESOURCES")]
    pub kube_reserved: Option<String>,
    /// Hard eviction thresholds: signal<quantity|percent,...
    #[arg(long, value_name = "THRESHOLDS")]
    pub eviction_hard: Option<String>,
    /// Soft eviction thresholds: signal<quantity|percent,... (each needs a grace period).
    #[arg(long, value_name = "THRESHOLDS")]
    pub eviction_soft: Option<String>,
    /// How long a soft threshold must hold before pods are evicted: signal=duration,...
    #[arg(long, value_name = "GRACE_PERIODS")]
    pub eviction_soft_grace_period: Option<String>,
    /// How much past its threshold a signal must recover before pressure ends: signal=quantity|percent,...
    #[arg(long, value_name = "RECLAIMS")]
    pub eviction_minimum_reclaim: Option<String>,
    /// How long a pressure condition stays after its threshold stops being met [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub eviction_pressure_transition_period: Option<String>,
    /// Longest grace period (seconds) a pod gets when a soft threshold evicts it; 0 uses the pod's own [default: 0].
    #[arg(long, value_name = "SECONDS")]
    pub eviction_max_pod_grace_period: Option<String>,
    /// An unused image younger than this is never garbage-collected [default: 2m].
    #[arg(long, value_name = "DURATION")]
    pub minimum_image_ttl_duration: Option<String>,
    /// Dead instances kept per container (-1: no limit) [default: 1].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub maximum_dead_containers_per_container: Option<String>,
    /// Dead instances kept on the node (-1: no limit) [default: -1].
    #[arg(long, value_name = "N", allow_hyphen_values = true)]
    pub maximum_dead_containers: Option<String>,
    /// A dead container younger than this is never garbage-collected [default: 0].
    #[arg(long, value_name = "DURATION")]
    pub minimum_container_ttl_duration: Option<String>,
    /// How often images are garbage-collected (wasm-kubelet's own; the kubelet's fixed period) [default: 5m].
    #[arg(long, value_name = "DURATION")]
    pub image_gc_period: Option<String>,
    /// How often dead containers are garbage-collected (wasm-kubelet's own; the kubelet's fixed period) [default: 1m].
    #[arg(long, value_name = "DURATION")]
    pub container_gc_period: Option<String>,
    /// Disk usage percent that starts image garbage collection [default: 85].
    #[arg(long, value_name = "PERCENT")]
    pub image_gc_high_threshold: Option<String>,
    /// Disk usage percent image garbage collection frees down to [default: 80].
    #[arg(long, value_name = "PERCENT")]
    pub image_gc_low_threshold: Option<String>,
    /// Refused: Wasm pods have no sysctls.
    #[arg(long, value_name = "LIST")]
    pub allowed_unsafe_sysctls: Option<String>,
    /// Accepted and ignored: there is no pause container.
    #[arg(long, value_name = "IMAGE")]
    pub pod_infra_container_image: Option<String>,
    /// containerd socket for ordinary OCI containers (the native backend).
    #[arg(long, value_name = "ENDPOINT")]
    pub container_runtime_endpoint: Option<String>,
    /// Log verbosity, as the kubelet's -v: 0-3 info, 4-5 debug, 6+ trace.
    #[arg(short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u8>,
}

/// The subset of KubeletConfiguration this agent reads. Unknown fields are an error, so a typo
/// never silently does nothing.
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct ConfigFile {
    api_version: Option<String>,
    kind: Option<String>,
    static_pod_path: Option<PathBuf>,
    pod_logs_dir: Option<PathBuf>,
    #[serde(rename = "staticPodURL")]
    static_pod_url: Option<String>,
    #[serde(rename = "staticPodURLHeader")]
    static_pod_url_header: Option<BTreeMap<String, Vec<String>>>,
    file_check_frequency: Option<String>,
    http_check_frequency: Option<String>,
    sync_frequency: Option<String>,
    node_status_update_frequency: Option<String>,
    node_status_report_frequency: Option<String>,
    node_lease_duration_seconds: Option<u32>,
    enable_server: Option<bool>,
    port: Option<u32>,
    healthz_port: Option<u32>,
    max_pods: Option<u32>,
    system_reserved: Option<BTreeMap<String, String>>,
    kube_reserved: Option<BTreeMap<String, String>>,
    eviction_hard: Option<BTreeMap<String, String>>,
    eviction_soft: Option<BTreeMap<String, String>>,
    eviction_soft_grace_period: Option<BTreeMap<String, String>>,
    eviction_minimum_reclaim: Option<BTreeMap<String, String>>,
    eviction_pressure_transition_period: Option<String>,
    eviction_max_pod_grace_period: Option<i64>,
    #[serde(rename = "imageMinimumGCAge")]
    image_minimum_gc_age: Option<String>,
    image_g_c_high_threshold_percent: Option<u32>,
    image_g_c_low_threshold_percent: Option<u32>,
    image_pull_progress_deadline: Option<String>,
    /// wasm-kubelet's own fields (see the flags of the same names).
    insecure_registries: Option<Vec<String>>,
    max_module_size: Option<String>,
    max_layer_uncompressed_size: Option<String>,
    streaming_connection_idle_timeout: Option<String>,
    housekeeping_interval: Option<String>,
    register_node: Option<bool>,
    register_with_taints: Option<Vec<TaintSpec>>,
    #[serde(rename = "providerID")]
    provider_id: Option<String>,
    allowed_unsafe_sysctls: Option<Vec<String>>,
    #[serde(rename = "podEgressDenyCIDRs")]
    pod_egress_deny_cidrs: Option<Vec<String>>,
    #[serde(rename = "podEgressAllowCIDRs")]
    pod_egress_allow_cidrs: Option<Vec<String>>,
    address: Option<String>,
    tls_cert_file: Option<PathBuf>,
    tls_private_key_file: Option<PathBuf>,
    rotate_certificates: Option<bool>,
    #[serde(rename = "serverTLSBootstrap")]
    server_tls_bootstrap: Option<bool>,
    authentication: Option<AuthenticationFile>,
    authorization: Option<AuthorizationFile>,
}

/// KubeletConfiguration `authentication` (the subset read).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthenticationFile {
    x509: Option<X509File>,
    webhook: Option<EnabledFile>,
    anonymous: Option<EnabledFile>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct X509File {
    #[serde(rename = "clientCAFile")]
    client_ca_file: Option<PathBuf>,
}

#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct EnabledFile {
    enabled: Option<bool>,
}

/// KubeletConfiguration `authorization` (the subset read).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields)]
struct AuthorizationFile {
    mode: Option<String>,
}

/// Where the Wasm guests run (`--wasm-runtime`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum WasmRuntimeMode {
    /// A runtime process apart from the agent, started by the agent when none answers.
    Spawn,
    /// A runtime process started by the host; the agent only connects to it.
    External,
    /// Inside the agent process.
    InAgent,
}

/// How the kubelet API authorizes a request (`--authorization-mode`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AuthorizationMode {
    /// Every authenticated request is allowed.
    AlwaysAllow,
    /// A SubjectAccessReview asks the API server.
    Webhook,
}

/// A node taint, as given by --register-with-taints or registerWithTaints.
#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TaintSpec {
    pub key: String,
    #[serde(default)]
    pub value: Option<String>,
    pub effect: String,
}

/// One hard eviction threshold, e.g. `memory.available<100Mi`.
#[derive(Debug, Clone, PartialEq)]
pub struct EvictionThreshold {
    pub signal: EvictionSignal,
    pub limit: ThresholdValue,
}

/// The signals the kubelet defines for eviction on Linux.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum EvictionSignal {
    MemoryAvailable,
    NodefsAvailable,
    NodefsInodesFree,
    ImagefsAvailable,
    ImagefsInodesFree,
    PidAvailable,
}

impl EvictionSignal {
    fn parse(s: &str) -> Option<Self> {
        Some(match s {
            "memory.available" => Self::MemoryAvailable,
            "nodefs.available" => Self::NodefsAvailable,
            "nodefs.inodesFree" => Self::NodefsInodesFree,
            "imagefs.available" => Self::ImagefsAvailable,
            "imagefs.inodesFree" => Self::ImagefsInodesFree,
            "pid.available" => Self::PidAvailable,
            _ => return None,
        })
    }

    /// The kubelet's name of the signal, e.g. `memory.available`.
    pub fn as_str(&self) -> &'static str {
        match self {
            Self::MemoryAvailable => "memory.available",
            Self::NodefsAvailable => "nodefs.available",
            Self::NodefsInodesFree => "nodefs.inodesFree",
            Self::ImagefsAvailable => "imagefs.available",
            Self::ImagefsInodesFree => "imagefs.inodesFree",
            Self::PidAvailable => "pid.available",
        }
    }
}

/// Resources set aside from allocatable (`--system-reserved`, `--kube-reserved`), in the
/// units admission compares: millicores, bytes, process ids.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Reserved {
    pub milli_cpu: u64,
    pub memory: u64,
    pub ephemeral_storage: u64,
    pub pid: u64,
}

impl Reserved {
    /// `cpu=100m,memory=1Gi,ephemeral-storage=1Gi,pid=1000`; the kubelet's resource names only.
    fn parse(flag: &'static str, v: &str) -> Result<Self, ConfigError> {
        let mut r = Reserved::default();
        for item in v.split(',').map(str::trim).filter(|s| !s.is_empty()) {
            let (name, value) = item.split_once('=').ok_or_else(|| invalid(flag, item, "expected resource=quantity"))?;
            let quantity = |q: &str| crate::quantity::bytes(q.trim()).map_err(|reason| invalid(flag, item, reason.to_string()));
            match name.trim() {
                // Millicores: `100m`, or cores (`0.5`), rounded up as the kubelet reads them.
                "cpu" => r.milli_cpu = crate::quantity::milli_cpu(value.trim()).map_err(|reason| invalid(flag, item, reason.to_string()))?,
                "memory" => r.memory = quantity(value)?,
                "ephemeral-storage" => r.ephemeral_storage = quantity(value)?,
                "pid" => r.pid = quantity(value)?,
                other => return Err(invalid(flag, item, format!("unknown resource {other:?} (cpu, memory, ephemeral-storage, pid)"))),
            }
        }
        Ok(r)
    }
}

/// A threshold: an absolute quantity (bytes, inodes, pids) or a percentage of capacity.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum ThresholdValue {
    Quantity(u64),
    Percent(f64),
}

impl ThresholdValue {
    /// The threshold in absolute units, given the capacity it is a share of.
    pub fn absolute(&self, capacity: u64) -> u64 {
        match *self {
            Self::Quantity(q) => q,
            Self::Percent(p) => (capacity as f64 * p / 100.0) as u64,
        }
    }
}

/// Everything the agent needs, checked. Built by [`Config::load`].
#[derive(Debug, Clone)]
pub struct Config {
    pub node_name: String,
    pub kubeconfig: Option<PathBuf>,
    pub cert_dir: PathBuf,
    /// `--bootstrap-kubeconfig`: credentials to request a client certificate with when
    /// `--kubeconfig` is missing or its certificate expired (see `certificates::client`).
    pub bootstrap_kubeconfig: Option<PathBuf>,
    pub rotate_certificates: bool,
    /// `--rotate-server-certificates` / serverTLSBootstrap.
    pub rotate_server_certificates: bool,
    pub root_dir: PathBuf,
    pub pod_logs_dir: PathBuf,
    pub node_ip: Option<IpAddr>,
    pub provider_id: Option<String>,
    pub register_node: bool,
    pub register_with_taints: Vec<TaintSpec>,
    pub node_labels: BTreeMap<String, String>,
    pub node_status_update_frequency: Duration,
    pub node_status_report_frequency: Duration,
    pub node_lease_duration: Duration,
    pub pod_manifest_path: Option<PathBuf>,
    pub manifest_url: Option<String>,
    /// Headers sent with every `--manifest-url` request.
    pub manifest_url_header: Vec<(String, String)>,
    pub file_check_frequency: Duration,
    pub http_check_frequency: Duration,
    pub sync_frequency: Duration,
    pub runonce: bool,
    /// `--wasm-runtime` (`InAgent` whenever `--runonce` is set: nothing outlives a run-once agent).
    pub wasm_runtime: WasmRuntimeMode,
    /// `--wasm-runtime-endpoint`.
    pub wasm_runtime_endpoint: PathBuf,
    pub enable_server: bool,
    pub port: u16,
    pub healthz_port: u16,
    /// Where the kubelet API listens (`--address`).
    pub address: IpAddr,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub client_ca_file: Option<PathBuf>,
    pub anonymous_auth: bool,
    pub authentication_token_webhook: bool,
    pub authorization_mode: AuthorizationMode,
    pub housekeeping_interval: Duration,
    pub image_pull_progress_deadline: Duration,
    /// `--streaming-connection-idle-timeout`; zero: sessions are never closed for idleness.
    pub streaming_connection_idle_timeout: Duration,
    /// `--registry-ca-file`: extra CAs for registries (read and checked by main).
    pub registry_ca_file: Option<PathBuf>,
    /// `--insecure-registries` (`insecureRegistries`): the only registries spoken to over plain
    /// http, `host[:port]` each. The one place this setting lives.
    pub insecure_registries: Vec<String>,
    /// `--max-module-size` in bytes.
    pub max_module_size: u64,
    /// `--max-layer-uncompressed-size` in bytes.
    pub max_layer_uncompressed_size: u64,
    /// `--pod-egress-deny-cidrs` / podEgressDenyCIDRs: addresses no pod may reach.
    pub pod_egress_deny_cidrs: Vec<ipnet::IpNet>,
    /// `--pod-egress-allow-cidrs` / podEgressAllowCIDRs: link-local or loopback addresses pods may reach.
    pub pod_egress_allow_cidrs: Vec<ipnet::IpNet>,
    pub max_pods: u32,
    /// `--system-reserved` and `--kube-reserved`: subtracted from capacity for allocatable.
    pub system_reserved: Reserved,
    pub kube_reserved: Reserved,
    pub eviction_hard: Vec<EvictionThreshold>,
    /// Soft thresholds; each signal has its grace period in `eviction_soft_grace_period`.
    pub eviction_soft: Vec<EvictionThreshold>,
    pub eviction_soft_grace_period: BTreeMap<EvictionSignal, Duration>,
    pub eviction_minimum_reclaim: BTreeMap<EvictionSignal, ThresholdValue>,
    pub eviction_pressure_transition_period: Duration,
    /// Zero: a soft eviction gives the pod its own termination grace period.
    pub eviction_max_pod_grace_period: Duration,
    pub minimum_image_ttl_duration: Duration,
    /// Negative: no limit.
    pub maximum_dead_containers_per_container: i32,
    /// Negative: no limit.
    pub maximum_dead_containers: i32,
    pub minimum_container_ttl_duration: Duration,
    pub image_gc_period: Duration,
    pub container_gc_period: Duration,
    pub image_gc_high_threshold: u8,
    pub image_gc_low_threshold: u8,
    pub verbosity: u8,
    /// Notices about accepted-but-ignored settings, logged once tracing is up.
    pub notices: Vec<String>,
}

impl Config {
    /// Parses the command line (`args` includes the program name), reads `--config` and the
    /// kubeconfig, and checks every value.
    pub fn load<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        let flags = Flags::try_parse_from(args).map_err(|e| {
            let text = e.render().to_string();
            match e.kind() {
                clap::error::ErrorKind::DisplayHelp | clap::error::ErrorKind::DisplayVersion => ConfigError::HelpRequested(text),
                // clap renders usage help after the error; the user gets the first line only.
                _ => ConfigError::Usage(text.lines().next().unwrap_or("bad command line").trim_start_matches("error: ").to_string()),
            }
        })?;
        let file = match &flags.config {
            Some(path) => read_config_file(path)?,
            None => ConfigFile::default(),
        };
        Self::merge(flags, file)
    }

    fn merge(flags: Flags, file: ConfigFile) -> Result<Self, ConfigError> {
        let mut notices = Vec::new();

        if let Some(sysctls) = flags.allowed_unsafe_sysctls.clone().or(file.allowed_unsafe_sysctls.map(|v| v.join(","))) {
            if !sysctls.trim().is_empty() {
                return Err(ConfigError::Unsupported {
                    flag: "--allowed-unsafe-sysctls",
                    reason: "WebAssembly pods have no kernel sysctls".into(),
                });
            }
        }
        if let Some(image) = &flags.pod_infra_container_image {
            notices.push(format!("--pod-infra-container-image={image} is ignored: wasm-kubelet has no pause container"));
        }
        if let Some(endpoint) = &flags.container_runtime_endpoint {
            return Err(ConfigError::Unsupported {
                flag: "--container-runtime-endpoint",
                reason: format!("the containerd backend is not implemented yet (got {endpoint:?}); omit the flag to run Wasm pods only"),
            });
        }

        let root_dir = flags.root_dir.unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT_DIR));
        if !root_dir.is_absolute() {
            return Err(invalid("--root-dir", root_dir.display(), "must be an absolute path"));
        }
        let cert_dir = flags.cert_dir.unwrap_or_else(|| root_dir.join("pki"));
        let pod_logs_dir = flags.pod_logs_dir.or(file.pod_logs_dir).unwrap_or_else(|| PathBuf::from(DEFAULT_POD_LOGS_DIR));
        if !pod_logs_dir.is_absolute() {
            return Err(invalid("--pod-logs-dir", pod_logs_dir.display(), "must be an absolute path"));
        }

        let node_name = match flags.hostname_override {
            Some(name) => name.trim().to_lowercase(),
            None => hostname().to_lowercase(),
        };
        if !is_dns_subdomain(&node_name) {
            return Err(invalid("--hostname-override", &node_name, "the node name must be a lowercase DNS subdomain (RFC 1123)"));
        }

        let node_ip = flags
            .node_ip
            .map(|ip| ip.parse::<IpAddr>().map_err(|_| invalid("--node-ip", &ip, "not an IP address")))
            .transpose()?;
        if node_ip.is_some_and(|ip| ip.is_unspecified()) {
            return Err(invalid("--node-ip", node_ip.unwrap(), "must be a concrete address, not 0.0.0.0 or ::"));
        }

        // TLS bootstrap: --kubeconfig is where the node's credentials are written when it is
        // missing or unusable, so it is checked at start-up (certificates::client), not here.
        let bootstrap_kubeconfig = match (&flags.bootstrap_kubeconfig, &flags.kubeconfig) {
            (Some(path), None) => {
                return Err(invalid("--bootstrap-kubeconfig", path.display(), "needs --kubeconfig: the path the node's kubeconfig is written to"))
            }
            (Some(path), Some(_)) => {
                check_kubeconfig(path)?;
                Some(path.clone())
            }
            (None, _) => None,
        };
        let kubeconfig = match flags.kubeconfig {
            Some(path) => {
                if bootstrap_kubeconfig.is_none() {
                    check_kubeconfig(&path)?;
                }
                Some(path)
            }
            None => None,
        };
        let rotate_certificates = match flags.rotate_certificates {
            Some(v) => parse_bool("--rotate-certificates", &v)?,
            None => file.rotate_certificates.unwrap_or(false),
        };
        let rotate_server_certificates = match flags.rotate_server_certificates {
            Some(v) => parse_bool("--rotate-server-certificates", &v)?,
            None => file.server_tls_bootstrap.unwrap_or(false),
        };
        if kubeconfig.is_none() {
            if rotate_certificates {
                return Err(invalid("--rotate-certificates", true, "needs --kubeconfig: the API server signs the new certificates"));
            }
            if rotate_server_certificates {
                return Err(invalid("--rotate-server-certificates", true, "needs --kubeconfig: the API server signs the new certificates"));
            }
        }

        let register_node = match flags.register_node {
            Some(v) => parse_bool("--register-node", &v)?,
            None => file.register_node.unwrap_or(true),
        };
        let register_with_taints = match flags.register_with_taints {
            Some(v) => parse_taints(&v)?,
            None => {
                let taints = file.register_with_taints.unwrap_or_default();
                for t in &taints {
                    check_taint("registerWithTaints", t)?;
                }
                taints
            }
        };
        let node_labels = match flags.node_labels {
            Some(v) => parse_labels(&v)?,
            None => BTreeMap::new(),
        };

        let duration = |flag: &'static str, given: Option<String>, from_file: Option<String>, default: Duration| {
            match given.or(from_file) {
                Some(v) => parse_duration(&v).map_err(|reason| invalid(flag, &v, reason)),
                None => Ok(default),
            }
        };
        let node_status_update_frequency = duration(
            "--node-status-update-frequency",
            flags.node_status_update_frequency,
            file.node_status_update_frequency,
            DEFAULT_NODE_STATUS_UPDATE_FREQUENCY,
        )?;
        if node_status_update_frequency.is_zero() {
            return Err(invalid("--node-status-update-frequency", "0s", "must be positive"));
        }
        let node_status_report_frequency = duration(
            "nodeStatusReportFrequency",
            None,
            file.node_status_report_frequency,
            DEFAULT_NODE_STATUS_REPORT_FREQUENCY,
        )?
        .max(node_status_update_frequency);
        let node_lease_duration = match file.node_lease_duration_seconds {
            Some(0) => return Err(invalid("nodeLeaseDurationSeconds", 0, "must be positive")),
            Some(s) => Duration::from_secs(s.into()),
            None => DEFAULT_NODE_LEASE_DURATION,
        };
        let file_check_frequency =
            duration("--file-check-frequency", flags.file_check_frequency, file.file_check_frequency, DEFAULT_FILE_CHECK_FREQUENCY)?;
        let http_check_frequency =
            duration("--http-check-frequency", flags.http_check_frequency, file.http_check_frequency, DEFAULT_HTTP_CHECK_FREQUENCY)?;
        let sync_frequency = duration("--sync-frequency", flags.sync_frequency, file.sync_frequency, DEFAULT_SYNC_FREQUENCY)?;
        let housekeeping_interval =
            duration("--housekeeping-interval", flags.housekeeping_interval, file.housekeeping_interval, DEFAULT_HOUSEKEEPING_INTERVAL)?;
        let image_pull_progress_deadline = duration(
            "--image-pull-progress-deadline",
            flags.image_pull_progress_deadline,
            file.image_pull_progress_deadline,
            DEFAULT_IMAGE_PULL_PROGRESS_DEADLINE,
        )?;
        if image_pull_progress_deadline.is_zero() {
            return Err(invalid("--image-pull-progress-deadline", "0s", "must be positive"));
        }
        let insecure_registries = match (&flags.insecure_registries, file.insecure_registries) {
            (Some(list), _) => list.split(',').map(str::trim).filter(|r| !r.is_empty()).map(str::to_string).collect(),
            (None, list) => list.unwrap_or_default().into_iter().map(|r| r.trim().to_string()).collect::<Vec<_>>(),
        };
        for registry in &insecure_registries {
            let valid = !registry.is_empty() && !registry.contains(['/', ' ', '@']) && !registry.contains("://");
            if !valid {
                return Err(invalid("--insecure-registries", registry, "want host[:port], e.g. registry.lan:5000"));
            }
        }
        let size = |flag: &'static str, given: Option<String>, from_file: Option<String>, default: u64| match given.or(from_file) {
            Some(v) => match crate::quantity::bytes(&v) {
                Ok(0) => Err(invalid(flag, &v, "must be positive")),
                Ok(n) => Ok(n),
                Err(reason) => Err(invalid(flag, &v, reason.to_string())),
            },
            None => Ok(default),
        };
        let max_module_size = size("--max-module-size", flags.max_module_size, file.max_module_size, provider_wasmtime::image::DEFAULT_MAX_MODULE_SIZE)?;
        let max_layer_uncompressed_size = size(
            "--max-layer-uncompressed-size",
            flags.max_layer_uncompressed_size,
            file.max_layer_uncompressed_size,
            provider_wasmtime::image::DEFAULT_MAX_LAYER_UNCOMPRESSED_SIZE,
        )?;
        let streaming_connection_idle_timeout = duration(
            "--streaming-connection-idle-timeout",
            flags.streaming_connection_idle_timeout,
            file.streaming_connection_idle_timeout,
            DEFAULT_STREAMING_CONNECTION_IDLE_TIMEOUT,
        )?;

        let pod_manifest_path = flags.pod_manifest_path.or(file.static_pod_path);
        let manifest_url = flags.manifest_url.or(file.static_pod_url);
        let mut manifest_url_header = Vec::new();
        if flags.manifest_url_header.is_empty() {
            for (k, values) in file.static_pod_url_header.into_iter().flatten() {
                manifest_url_header.extend(values.into_iter().map(|v| (k.clone(), v)));
            }
        }
        for h in &flags.manifest_url_header {
            match h.split_once(':') {
                Some((k, v)) if !k.trim().is_empty() && !k.contains(char::is_whitespace) && !v.contains(['\r', '\n']) => {
                    manifest_url_header.push((k.trim().to_string(), v.trim().to_string()))
                }
                _ => return Err(invalid("--manifest-url-header", h, "want Key:Value")),
            }
        }
        if let Some(url) = &manifest_url {
            if !url.starts_with("http://") && !url.starts_with("https://") {
                return Err(invalid("--manifest-url", url, "only http:// and https:// URLs are supported"));
            }
        }
        let runonce = match flags.runonce {
            Some(v) => parse_bool("--runonce", &v)?,
            None => false,
        };
        let wasm_runtime = match flags.wasm_runtime.as_deref() {
            _ if runonce => WasmRuntimeMode::InAgent,
            None | Some("spawn") => WasmRuntimeMode::Spawn,
            Some("external") => WasmRuntimeMode::External,
            Some("in-agent") => WasmRuntimeMode::InAgent,
            Some(other) => return Err(invalid("--wasm-runtime", other, "want spawn, external or in-agent")),
        };
        let wasm_runtime_endpoint = flags.wasm_runtime_endpoint.unwrap_or_else(|| root_dir.join("runtime").join("wasm-runtime.sock"));
        if !wasm_runtime_endpoint.is_absolute() {
            return Err(invalid("--wasm-runtime-endpoint", wasm_runtime_endpoint.display(), "must be an absolute path"));
        }

        let enable_server = match flags.enable_server {
            Some(v) => parse_bool("--enable-server", &v)?,
            None => file.enable_server.unwrap_or(true),
        };
        let port = parse_port("--port", flags.port, file.port, DEFAULT_PORT, false)?;
        let healthz_port = parse_port("--healthz-port", flags.healthz_port, file.healthz_port, DEFAULT_HEALTHZ_PORT, true)?;
        let address = match flags.address.or(file.address) {
            Some(v) => v.trim().parse::<IpAddr>().map_err(|_| invalid("--address", &v, "not an IP address"))?,
            None => DEFAULT_ADDRESS,
        };
        let tls_cert_file = flags.tls_cert_file.or(file.tls_cert_file);
        let tls_private_key_file = flags.tls_private_key_file.or(file.tls_private_key_file);
        match (&tls_cert_file, &tls_private_key_file) {
            (Some(_), None) => return Err(invalid("--tls-cert-file", tls_cert_file.as_ref().map_or(String::new(), |p| p.display().to_string()), "--tls-private-key-file must be given too")),
            (None, Some(key)) => return Err(invalid("--tls-private-key-file", key.display(), "--tls-cert-file must be given too")),
            _ => {}
        }
        if rotate_server_certificates && tls_cert_file.is_some() {
            return Err(invalid("--rotate-server-certificates", true, "the serving certificate comes from a CSR; do not give --tls-cert-file too"));
        }
        let authn = file.authentication.unwrap_or_default();
        let client_ca_file = flags.client_ca_file.or(authn.x509.and_then(|x| x.client_ca_file));
        let anonymous_auth = match flags.anonymous_auth {
            Some(v) => parse_bool("--anonymous-auth", &v)?,
            None => authn.anonymous.and_then(|a| a.enabled).unwrap_or(DEFAULT_ANONYMOUS_AUTH),
        };
        // Standalone there is no API server to send TokenReviews and SubjectAccessReviews to.
        let authentication_token_webhook = match flags.authentication_token_webhook {
            Some(v) => parse_bool("--authentication-token-webhook", &v)?,
            None => authn.webhook.and_then(|w| w.enabled).unwrap_or(kubeconfig.is_some()),
        };
        if authentication_token_webhook && kubeconfig.is_none() {
            return Err(invalid("--authentication-token-webhook", true, "needs --kubeconfig: TokenReview asks the API server"));
        }
        let authorization_mode = match flags.authorization_mode.or(file.authorization.and_then(|a| a.mode)) {
            Some(v) => match v.as_str() {
                "Webhook" => AuthorizationMode::Webhook,
                "AlwaysAllow" => AuthorizationMode::AlwaysAllow,
                _ => return Err(invalid("--authorization-mode", &v, "must be Webhook or AlwaysAllow")),
            },
            None if kubeconfig.is_some() => AuthorizationMode::Webhook,
            None => AuthorizationMode::AlwaysAllow,
        };
        if authorization_mode == AuthorizationMode::Webhook && kubeconfig.is_none() {
            return Err(invalid("--authorization-mode", "Webhook", "needs --kubeconfig: SubjectAccessReview asks the API server"));
        }

        let max_pods = match flags.max_pods {
            Some(v) => v.parse::<u32>().map_err(|_| invalid("--max-pods", &v, "not a whole number"))?,
            None => file.max_pods.unwrap_or(DEFAULT_MAX_PODS),
        };
        if max_pods == 0 {
            return Err(invalid("--max-pods", 0, "must be at least 1"));
        }
        let system_reserved = match (flags.system_reserved, file.system_reserved) {
            (Some(v), _) => Reserved::parse("--system-reserved", &v)?,
            (None, Some(map)) => Reserved::parse("systemReserved", &map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))?,
            (None, None) => Reserved::default(),
        };
        let kube_reserved = match (flags.kube_reserved, file.kube_reserved) {
            (Some(v), _) => Reserved::parse("--kube-reserved", &v)?,
            (None, Some(map)) => Reserved::parse("kubeReserved", &map.iter().map(|(k, v)| format!("{k}={v}")).collect::<Vec<_>>().join(","))?,
            (None, None) => Reserved::default(),
        };

        let eviction_hard = match (flags.eviction_hard, file.eviction_hard) {
            (Some(v), _) => parse_eviction("--eviction-hard", &v)?,
            (None, Some(map)) => {
                let joined = map.iter().map(|(k, v)| format!("{k}<{v}")).collect::<Vec<_>>().join(",");
                parse_eviction("evictionHard", &joined)?
            }
            (None, None) => parse_eviction("--eviction-hard", DEFAULT_EVICTION_HARD)?,
        };
        let joined = |map: BTreeMap<String, String>, sep: char| map.iter().map(|(k, v)| format!("{k}{sep}{v}")).collect::<Vec<_>>().join(",");
        let eviction_soft = match (flags.eviction_soft, file.eviction_soft) {
            (Some(v), _) => parse_eviction("--eviction-soft", &v)?,
            (None, Some(map)) => parse_eviction("evictionSoft", &joined(map, '<'))?,
            (None, None) => Vec::new(),
        };
        let mut eviction_soft_grace_period = BTreeMap::new();
        let (flag, text) = match (flags.eviction_soft_grace_period, file.eviction_soft_grace_period) {
            (Some(v), _) => ("--eviction-soft-grace-period", v),
            (None, Some(map)) => ("evictionSoftGracePeriod", joined(map, '=')),
            (None, None) => ("--eviction-soft-grace-period", String::new()),
        };
        for (signal, value) in parse_signal_map(flag, &text)? {
            let grace = parse_duration(&value).map_err(|reason| invalid(flag, format!("{}={value}", signal.as_str()), reason))?;
            eviction_soft_grace_period.insert(signal, grace);
        }
        if let Some(t) = eviction_soft.iter().find(|t| !eviction_soft_grace_period.contains_key(&t.signal)) {
            return Err(invalid("--eviction-soft-grace-period", "", format!("a grace period must be given for the soft eviction threshold {}", t.signal.as_str())));
        }
        let mut eviction_minimum_reclaim = BTreeMap::new();
        let (flag, text) = match (flags.eviction_minimum_reclaim, file.eviction_minimum_reclaim) {
            (Some(v), _) => ("--eviction-minimum-reclaim", v),
            (None, Some(map)) => ("evictionMinimumReclaim", joined(map, '=')),
            (None, None) => ("--eviction-minimum-reclaim", String::new()),
        };
        for (signal, value) in parse_signal_map(flag, &text)? {
            let item = format!("{}={value}", signal.as_str());
            let reclaim = match value.strip_suffix('%') {
                Some(p) => ThresholdValue::Percent(p.parse::<f64>().ok().filter(|p| (0.0..=100.0).contains(p)).ok_or_else(|| invalid(flag, &item, "a percentage must be between 0 and 100"))?),
                None => ThresholdValue::Quantity(crate::quantity::bytes(&value).map_err(|reason| invalid(flag, &item, reason.to_string()))?),
            };
            eviction_minimum_reclaim.insert(signal, reclaim);
        }
        let eviction_pressure_transition_period = duration(
            "--eviction-pressure-transition-period",
            flags.eviction_pressure_transition_period,
            file.eviction_pressure_transition_period,
            DEFAULT_EVICTION_PRESSURE_TRANSITION_PERIOD,
        )?;
        let eviction_max_pod_grace_period = match flags.eviction_max_pod_grace_period {
            Some(v) => v.parse::<i64>().map_err(|_| invalid("--eviction-max-pod-grace-period", &v, "not a whole number of seconds"))?,
            None => file.eviction_max_pod_grace_period.unwrap_or(0),
        };
        // As the kubelet: zero or less means the pod's own grace period.
        let eviction_max_pod_grace_period = Duration::from_secs(eviction_max_pod_grace_period.max(0) as u64);
        let minimum_image_ttl_duration =
            duration("--minimum-image-ttl-duration", flags.minimum_image_ttl_duration, file.image_minimum_gc_age, DEFAULT_MINIMUM_IMAGE_TTL)?;
        let count = |flag: &'static str, given: Option<String>, default: i32| match given {
            Some(v) => v.parse::<i32>().map_err(|_| invalid(flag, &v, "not a whole number")),
            None => Ok(default),
        };
        let maximum_dead_containers_per_container = count(
            "--maximum-dead-containers-per-container",
            flags.maximum_dead_containers_per_container,
            DEFAULT_MAXIMUM_DEAD_CONTAINERS_PER_CONTAINER,
        )?;
        let maximum_dead_containers = count("--maximum-dead-containers", flags.maximum_dead_containers, DEFAULT_MAXIMUM_DEAD_CONTAINERS)?;
        let minimum_container_ttl_duration = duration("--minimum-container-ttl-duration", flags.minimum_container_ttl_duration, None, Duration::ZERO)?;
        let image_gc_period = duration("--image-gc-period", flags.image_gc_period, None, DEFAULT_IMAGE_GC_PERIOD)?;
        let container_gc_period = duration("--container-gc-period", flags.container_gc_period, None, DEFAULT_CONTAINER_GC_PERIOD)?;
        if image_gc_period.is_zero() || container_gc_period.is_zero() {
            return Err(invalid(if image_gc_period.is_zero() { "--image-gc-period" } else { "--container-gc-period" }, "0s", "must be positive"));
        }

        let percent = |flag: &'static str, given: Option<String>, from_file: Option<u32>, default: u8| -> Result<u8, ConfigError> {
            let v = match given {
                Some(v) => v.parse::<u32>().map_err(|_| invalid(flag, &v, "not a whole number"))?,
                None => from_file.unwrap_or(default.into()),
            };
            u8::try_from(v).ok().filter(|p| *p <= 100).ok_or_else(|| invalid(flag, v, "must be between 0 and 100"))
        };
        let image_gc_high_threshold =
            percent("--image-gc-high-threshold", flags.image_gc_high_threshold, file.image_g_c_high_threshold_percent, DEFAULT_IMAGE_GC_HIGH)?;
        let image_gc_low_threshold =
            percent("--image-gc-low-threshold", flags.image_gc_low_threshold, file.image_g_c_low_threshold_percent, DEFAULT_IMAGE_GC_LOW)?;
        if image_gc_low_threshold > image_gc_high_threshold {
            return Err(invalid(
                "--image-gc-low-threshold",
                image_gc_low_threshold,
                format!("must not exceed --image-gc-high-threshold ({image_gc_high_threshold})"),
            ));
        }

        let provider_id = flags.provider_id.or(file.provider_id);
        let pod_egress_deny_cidrs = match flags.pod_egress_deny_cidrs.clone().or(file.pod_egress_deny_cidrs.map(|v| v.join(","))) {
            Some(list) => parse_cidrs(&list).map_err(|(entry, reason)| invalid("--pod-egress-deny-cidrs", entry, reason))?,
            None => Vec::new(),
        };
        let pod_egress_allow_cidrs = match flags.pod_egress_allow_cidrs.clone().or(file.pod_egress_allow_cidrs.map(|v| v.join(","))) {
            Some(list) => parse_cidrs(&list).map_err(|(entry, reason)| invalid("--pod-egress-allow-cidrs", entry, reason))?,
            None => Vec::new(),
        };

        Ok(Self {
            node_name,
            kubeconfig,
            cert_dir,
            bootstrap_kubeconfig,
            rotate_certificates,
            rotate_server_certificates,
            root_dir,
            pod_logs_dir,
            node_ip,
            provider_id,
            register_node,
            register_with_taints,
            node_labels,
            node_status_update_frequency,
            node_status_report_frequency,
            node_lease_duration,
            pod_manifest_path,
            manifest_url,
            manifest_url_header,
            file_check_frequency,
            http_check_frequency,
            sync_frequency,
            runonce,
            wasm_runtime,
            wasm_runtime_endpoint,
            enable_server,
            port,
            healthz_port,
            address,
            tls_cert_file,
            tls_private_key_file,
            client_ca_file,
            anonymous_auth,
            authentication_token_webhook,
            authorization_mode,
            housekeeping_interval,
            image_pull_progress_deadline,
            streaming_connection_idle_timeout,
            registry_ca_file: flags.registry_ca_file,
            insecure_registries,
            max_module_size,
            max_layer_uncompressed_size,
            pod_egress_deny_cidrs,
            pod_egress_allow_cidrs,
            max_pods,
            system_reserved,
            kube_reserved,
            eviction_hard,
            eviction_soft,
            eviction_soft_grace_period,
            eviction_minimum_reclaim,
            eviction_pressure_transition_period,
            eviction_max_pod_grace_period,
            minimum_image_ttl_duration,
            maximum_dead_containers_per_container,
            maximum_dead_containers,
            minimum_container_ttl_duration,
            image_gc_period,
            container_gc_period,
            image_gc_high_threshold,
            image_gc_low_threshold,
            verbosity: flags.verbosity.unwrap_or(0),
            notices,
        })
    }

    /// The kubelet renews its lease every quarter of its duration (10 s for the default 40 s).
    pub fn lease_renew_interval(&self) -> Duration {
        self.node_lease_duration / 4
    }
}

/// A comma-separated CIDR list; a bare address is its /32 or /128. Err: (the entry, why).
fn parse_cidrs(list: &str) -> Result<Vec<ipnet::IpNet>, (String, String)> {
    list.split(',')
        .map(str::trim)
        .filter(|s| !s.is_empty())
        .map(|s| {
            s.parse::<ipnet::IpNet>()
                .or_else(|_| s.parse::<IpAddr>().map(ipnet::IpNet::from))
                .map(|net| net.trunc())
                .map_err(|_| (s.to_string(), "not a CIDR (e.g. 10.0.0.0/8) or an IP address".to_string()))
        })
        .collect()
}

fn invalid(flag: &'static str, value: impl std::fmt::Display, reason: impl Into<String>) -> ConfigError {
    ConfigError::InvalidValue { flag, value: value.to_string(), reason: reason.into() }
}

fn read_config_file(path: &Path) -> Result<ConfigFile, ConfigError> {
    let text = std::fs::read_to_string(path).map_err(|e| ConfigError::ConfigFile { path: path.into(), reason: e.to_string() })?;
    let file: ConfigFile = serde_yaml::from_str(&text).map_err(|e| ConfigError::ConfigFile {
        path: path.into(),
        reason: e.to_string().replace('\n', " "),
    })?;
    if let Some(kind) = &file.kind {
        if kind != "KubeletConfiguration" {
            return Err(ConfigError::ConfigFile { path: path.into(), reason: format!("kind is {kind:?}, want KubeletConfiguration") });
        }
    }
    if let Some(api_version) = &file.api_version {
        if api_version != "kubelet.config.k8s.io/v1beta1" {
            return Err(ConfigError::ConfigFile {
                path: path.into(),
                reason: format!("apiVersion is {api_version:?}, want kubelet.config.k8s.io/v1beta1"),
            });
        }
    }
    Ok(file)
}

/// Reads and parses the kubeconfig now, so a broken one stops the agent before it starts.
fn check_kubeconfig(path: &Path) -> Result<(), ConfigError> {
    let kubeconfig = kube::config::Kubeconfig::read_from(path).map_err(|e| ConfigError::Kubeconfig {
        path: path.into(),
        reason: one_line(&e),
    })?;
    if kubeconfig.clusters.is_empty() {
        return Err(ConfigError::Kubeconfig { path: path.into(), reason: "it names no cluster".into() });
    }
    Ok(())
}

pub use provider_api::one_line;

fn parse_bool(flag: &'static str, v: &str) -> Result<bool, ConfigError> {
    // Go's strconv.ParseBool, which the kubelet's flags use.
    match v {
        "1" | "t" | "T" | "true" | "TRUE" | "True" => Ok(true),
        "0" | "f" | "F" | "false" | "FALSE" | "False" => Ok(false),
        _ => Err(invalid(flag, v, "not a boolean (true or false)")),
    }
}

fn parse_port(flag: &'static str, given: Option<String>, from_file: Option<u32>, default: u16, zero_ok: bool) -> Result<u16, ConfigError> {
    let v = match given {
        Some(v) => v.parse::<u32>().map_err(|_| invalid(flag, &v, "not a port number"))?,
        None => from_file.unwrap_or(default.into()),
    };
    match u16::try_from(v) {
        Ok(0) if zero_ok => Ok(0),
        Ok(p) if p > 0 => Ok(p),
        _ => Err(invalid(flag, v, if zero_ok { "must be between 0 and 65535" } else { "must be between 1 and 65535" })),
    }
}

/// Go's time.ParseDuration format: a sequence of number+unit, units ns us µs ms s m h.
pub fn parse_duration(s: &str) -> Result<Duration, String> {
    let s = s.trim();
    if s == "0" {
        return Ok(Duration::ZERO);
    }
    if s.is_empty() || s.starts_with('-') {
        return Err("want a duration such as 10s, 1m30s or 500ms".into());
    }
    let mut total = 0f64;
    let mut rest = s;
    while !rest.is_empty() {
        let num_len = rest.find(|c: char| !(c.is_ascii_digit() || c == '.')).unwrap_or(rest.len());
        if num_len == 0 {
            return Err("want a duration such as 10s, 1m30s or 500ms".into());
        }
        let number: f64 = rest[..num_len].parse().map_err(|_| "bad number in duration".to_string())?;
        rest = &rest[num_len..];
        let unit_len = rest.find(|c: char| c.is_ascii_digit() || c == '.').unwrap_or(rest.len());
        let scale = match &rest[..unit_len] {
            "ns" => 1e-9,
            "us" | "µs" => 1e-6,
            "ms" => 1e-3,
            "s" => 1.0,
            "m" => 60.0,
            "h" => 3600.0,
            "" => return Err("missing unit in duration (use ns, us, ms, s, m or h)".into()),
            other => return Err(format!("unknown unit {other:?} in duration")),
        };
        total += number * scale;
        rest = &rest[unit_len..];
    }
    Ok(Duration::from_secs_f64(total))
}

fn parse_labels(v: &str) -> Result<BTreeMap<String, String>, ConfigError> {
    let mut labels = BTreeMap::new();
    for pair in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (key, value) = pair.split_once('=').ok_or_else(|| invalid("--node-labels", pair, "want key=value"))?;
        if !is_qualified_name(key) {
            return Err(invalid("--node-labels", pair, format!("{key:?} is not a valid label key")));
        }
        if !is_label_value(value) {
            return Err(invalid("--node-labels", pair, format!("{value:?} is not a valid label value")));
        }
        labels.insert(key.to_string(), value.to_string());
    }
    Ok(labels)
}

fn parse_taints(v: &str) -> Result<Vec<TaintSpec>, ConfigError> {
    let mut taints = Vec::new();
    for item in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (kv, effect) = item.rsplit_once(':').ok_or_else(|| invalid("--register-with-taints", item, "want key=value:Effect"))?;
        let (key, value) = match kv.split_once('=') {
            Some((k, v)) => (k.to_string(), Some(v.to_string())),
            None => (kv.to_string(), None),
        };
        let taint = TaintSpec { key, value, effect: effect.to_string() };
        check_taint("--register-with-taints", &taint)?;
        taints.push(taint);
    }
    Ok(taints)
}

fn check_taint(flag: &'static str, t: &TaintSpec) -> Result<(), ConfigError> {
    let shown = format!("{}={}:{}", t.key, t.value.as_deref().unwrap_or(""), t.effect);
    if !matches!(t.effect.as_str(), "NoSchedule" | "PreferNoSchedule" | "NoExecute") {
        return Err(invalid(flag, shown, "the effect must be NoSchedule, PreferNoSchedule or NoExecute"));
    }
    if !is_qualified_name(&t.key) {
        return Err(invalid(flag, shown, format!("{:?} is not a valid taint key", t.key)));
    }
    if let Some(value) = &t.value {
        if !is_label_value(value) {
            return Err(invalid(flag, shown, format!("{value:?} is not a valid taint value")));
        }
    }
    Ok(())
}

fn parse_eviction(flag: &'static str, v: &str) -> Result<Vec<EvictionThreshold>, ConfigError> {
    let mut thresholds = Vec::new();
    for item in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (signal, limit) = item.split_once('<').ok_or_else(|| invalid(flag, item, "want signal<value, e.g. memory.available<100Mi"))?;
        let signal = EvictionSignal::parse(signal).ok_or_else(|| {
            invalid(flag, item, "unknown signal (memory.available, nodefs.available, nodefs.inodesFree, imagefs.available, imagefs.inodesFree, pid.available)")
        })?;
        let limit = match limit.strip_suffix('%') {
            Some(p) => {
                let p: f64 = p.parse().map_err(|_| invalid(flag, item, "bad percentage"))?;
                if !(0.0..=100.0).contains(&p) {
                    return Err(invalid(flag, item, "a percentage must be between 0 and 100"));
                }
                ThresholdValue::Percent(p)
            }
            None => ThresholdValue::Quantity(crate::quantity::bytes(limit).map_err(|reason| invalid(flag, item, reason.to_string()))?),
        };
        thresholds.push(EvictionThreshold { signal, limit });
    }
    Ok(thresholds)
}

/// `signal=value,...` (the form of --eviction-soft-grace-period and --eviction-minimum-reclaim).
fn parse_signal_map(flag: &'static str, v: &str) -> Result<Vec<(EvictionSignal, String)>, ConfigError> {
    let mut out = Vec::new();
    for item in v.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        let (signal, value) = item.split_once('=').ok_or_else(|| invalid(flag, item, "want signal=value, e.g. memory.available=1m30s"))?;
        let signal = EvictionSignal::parse(signal.trim()).ok_or_else(|| invalid(flag, item, "unknown signal"))?;
        out.push((signal, value.trim().to_string()));
    }
    Ok(out)
}

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname").map(|s| s.trim().to_string()).unwrap_or_else(|_| "localhost".into())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes().all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
        && !s.starts_with('-')
        && !s.ends_with('-')
}

/// RFC 1123 subdomain, as Kubernetes validates object names.
pub fn is_dns_subdomain(s: &str) -> bool {
    s.len() <= 253 && s.split('.').all(is_dns_label)
}

fn is_qualified_name(s: &str) -> bool {
    let (prefix, name) = match s.rsplit_once('/') {
        Some((p, n)) => (Some(p), n),
        None => (None, s),
    };
    prefix.is_none_or(is_dns_subdomain) && !name.is_empty() && name.len() <= 63 && is_label_value(name)
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
            && s.as_bytes()[0].is_ascii_alphanumeric()
            && s.as_bytes()[s.len() - 1].is_ascii_alphanumeric())
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;

    fn load(args: &[&str]) -> Result<Config, ConfigError> {
        let mut all = vec!["wasm-kubelet", "--hostname-override", "node-a"];
        all.extend_from_slice(args);
        Config::load(all)
    }

    fn err(args: &[&str]) -> String {
        let e = load(args).expect_err("expected a config error");
        let line = e.to_string();
        assert!(!line.contains('\n'), "error must be one line: {line}");
        line
    }

    fn temp_file(name: &str, text: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wasm-kubelet-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path).unwrap().write_all(text.as_bytes()).unwrap();
        path
    }

    #[test]
    fn defaults_are_the_kubelets() {
        let c = load(&[]).unwrap();
        assert_eq!(c.node_name, "node-a");
        assert_eq!(c.root_dir, PathBuf::from("/var/lib/wasm-kubelet"));
        assert_eq!(c.cert_dir, PathBuf::from("/var/lib/wasm-kubelet/pki"));
        assert_eq!(c.port, 10250);
        assert_eq!(c.healthz_port, 10248);
        assert_eq!(c.max_pods, 110);
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(10));
        assert_eq!(c.lease_renew_interval(), Duration::from_secs(10));
        assert!(c.register_node);
        assert!(c.kubeconfig.is_none());
        assert_eq!(c.eviction_hard.len(), 4);
        assert_eq!(c.eviction_hard[0], EvictionThreshold { signal: EvictionSignal::MemoryAvailable, limit: ThresholdValue::Quantity(100 << 20) });
    }

    #[test]
    fn eviction_and_gc_flags_have_the_kubelets_defaults_and_are_checked() {
        let c = load(&[]).unwrap();
        assert!(c.eviction_soft.is_empty() && c.eviction_minimum_reclaim.is_empty());
        assert_eq!(c.eviction_pressure_transition_period, Duration::from_secs(300));
        assert_eq!(c.eviction_max_pod_grace_period, Duration::ZERO);
        assert_eq!(c.minimum_image_ttl_duration, Duration::from_secs(120));
        assert_eq!((c.maximum_dead_containers_per_container, c.maximum_dead_containers), (1, -1));
        assert_eq!((c.image_gc_period, c.container_gc_period), (Duration::from_secs(300), Duration::from_secs(60)));

        let c = load(&[
            "--eviction-soft=memory.available<1Gi,nodefs.available<15%",
            "--eviction-soft-grace-period=memory.available=1m30s,nodefs.available=2m",
            "--eviction-minimum-reclaim=nodefs.available=5%,memory.available=500Mi",
            "--maximum-dead-containers=-1",
            "--maximum-dead-containers-per-container=2",
        ])
        .unwrap();
        assert_eq!(c.eviction_soft.len(), 2);
        assert_eq!(c.eviction_soft_grace_period[&EvictionSignal::MemoryAvailable], Duration::from_secs(90));
        assert_eq!(c.eviction_minimum_reclaim[&EvictionSignal::NodefsAvailable], ThresholdValue::Percent(5.0));
        assert_eq!(c.eviction_minimum_reclaim[&EvictionSignal::MemoryAvailable], ThresholdValue::Quantity(500 << 20));
        assert_eq!(c.maximum_dead_containers_per_container, 2);

        assert!(err(&["--eviction-soft=memory.available<1Gi"]).contains("grace period must be given for the soft eviction threshold memory.available"));
        assert!(err(&["--eviction-soft-grace-period=memory.free=1m"]).contains("--eviction-soft-grace-period"));
        assert!(err(&["--eviction-minimum-reclaim=nodefs.available=lots"]).contains("--eviction-minimum-reclaim"));
        assert!(err(&["--container-gc-period=0s"]).contains("--container-gc-period"));
        assert!(err(&["--maximum-dead-containers=many"]).contains("--maximum-dead-containers"));
    }

    #[test]
    fn image_pull_flags_have_defaults_and_are_checked() {
        let c = load(&[]).unwrap();
        assert!(c.insecure_registries.is_empty(), "no registry is plain http unless named");
        assert_eq!((c.max_module_size, c.max_layer_uncompressed_size), (256 << 20, 1 << 30));
        assert_eq!(c.image_pull_progress_deadline, Duration::from_secs(60));
        let c = load(&["--insecure-registries=127.0.0.1:5000, registry.lan", "--max-module-size=1Mi", "--max-layer-uncompressed-size=2Mi", "--image-pull-progress-deadline=30s"]).unwrap();
        assert_eq!(c.insecure_registries, vec!["127.0.0.1:5000".to_string(), "registry.lan".to_string()]);
        assert_eq!((c.max_module_size, c.max_layer_uncompressed_size), (1 << 20, 2 << 20));
        assert_eq!(c.image_pull_progress_deadline, Duration::from_secs(30));
        assert!(err(&["--insecure-registries=http://registry.lan"]).contains("--insecure-registries"));
        assert!(err(&["--insecure-registries=registry.lan/path"]).contains("--insecure-registries"));
        assert!(err(&["--max-module-size=0"]).contains("--max-module-size"));
        assert!(err(&["--max-module-size=lots"]).contains("--max-module-size"));
        assert!(err(&["--max-layer-uncompressed-size=1Xi"]).contains("--max-layer-uncompressed-size"));
        assert!(err(&["--image-pull-progress-deadline=0s"]).contains("--image-pull-progress-deadline"));
        let file = temp_file("pulls.yaml", "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ninsecureRegistries: [\"127.0.0.1:5000\"]\nmaxModuleSize: 64Mi\n");
        let c = load(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!((c.insecure_registries, c.max_module_size), (vec!["127.0.0.1:5000".to_string()], 64 << 20));
    }

    #[test]
    fn go_style_flags_parse() {
        let c = load(&[
            "--register-node=false",
            "--node-status-update-frequency=1m30s",
            "--node-ip=127.0.0.5",
            "--max-pods",
            "250",
            "--node-labels=a=b,example.com/tier=edge",
            "--register-with-taints=dedicated=edge:NoSchedule,gpu:NoExecute",
        ])
        .unwrap();
        assert!(!c.register_node);
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(90));
        assert_eq!(c.node_ip, Some("127.0.0.5".parse().unwrap()));
        assert_eq!(c.max_pods, 250);
        assert_eq!(c.node_labels.get("example.com/tier").map(String::as_str), Some("edge"));
        assert_eq!(c.register_with_taints[1], TaintSpec { key: "gpu".into(), value: None, effect: "NoExecute".into() });
    }

    #[test]
    fn bad_flags_are_one_line_naming_the_flag() {
        assert!(err(&["--no-such-flag"]).contains("--no-such-flag"));
        assert!(err(&["--node-ip=not-an-ip"]).contains("--node-ip"));
        assert!(err(&["--node-ip=0.0.0.0"]).contains("--node-ip"));
        assert!(err(&["--port=70000"]).contains("--port"));
        assert!(err(&["--port=0"]).contains("--port"));
        assert!(err(&["--max-pods=-3"]).contains("--max-pods"));
        assert!(err(&["--max-pods=0"]).contains("--max-pods"));
        assert!(err(&["--register-node=maybe"]).contains("--register-node"));
        assert!(err(&["--node-status-update-frequency=10"]).contains("--node-status-update-frequency"));
        assert!(err(&["--node-status-update-frequency=0s"]).contains("--node-status-update-frequency"));
        assert!(err(&["--node-labels=novalue"]).contains("--node-labels"));
        assert!(err(&["--register-with-taints=a=b:Sometimes"]).contains("--register-with-taints"));
        assert!(err(&["--eviction-hard=memory.free<1Gi"]).contains("--eviction-hard"));
        assert!(err(&["--image-gc-high-threshold=50", "--image-gc-low-threshold=60"]).contains("--image-gc-low-threshold"));
        assert!(err(&["--root-dir=relative/dir"]).contains("--root-dir"));
        assert!(err(&["--allowed-unsafe-sysctls=net.core.somaxconn"]).contains("no kernel sysctls"));
        assert!(err(&["--container-runtime-endpoint=unix:///run/containerd/containerd.sock"]).contains("--container-runtime-endpoint"));
        assert!(err(&["--runonce=perhaps"]).contains("--runonce"));
        assert!(err(&["--wasm-runtime=shim"]).contains("--wasm-runtime"));
        assert!(err(&["--wasm-runtime-endpoint=relative.sock"]).contains("--wasm-runtime-endpoint"));
        assert!(err(&["--manifest-url-header=NoColon"]).contains("--manifest-url-header"));
        assert!(err(&["--manifest-url=ftp://example.com/pods"]).contains("--manifest-url"));
        assert!(err(&["--streaming-connection-idle-timeout=4"]).contains("--streaming-connection-idle-timeout"));
    }

    #[test]
    fn static_pod_flags() {
        let c = load(&[
            "--runonce",
            "--pod-manifest-path=/etc/kubernetes/manifests",
            "--file-check-frequency=1s",
            "--manifest-url=http://127.0.0.1:8080/pods",
            "--manifest-url-header=X-Token:abc",
            "--manifest-url-header",
            "Accept: application/yaml",
        ])
        .unwrap();
        assert!(c.runonce);
        assert_eq!(c.pod_manifest_path, Some(PathBuf::from("/etc/kubernetes/manifests")));
        assert_eq!(c.file_check_frequency, Duration::from_secs(1));
        assert_eq!(c.http_check_frequency, Duration::from_secs(20));
        assert_eq!(c.manifest_url_header, vec![("X-Token".into(), "abc".into()), ("Accept".into(), "application/yaml".into())]);
        assert!(!c.notices.iter().any(|n| n.contains("static pods")), "{:?}", c.notices);
        let file = temp_file("static.yaml", "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nstaticPodURL: http://127.0.0.1/m\nstaticPodURLHeader: {X-A: [one, two]}\n");
        let c = load(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(c.manifest_url.as_deref(), Some("http://127.0.0.1/m"));
        assert_eq!(c.manifest_url_header, vec![("X-A".into(), "one".into()), ("X-A".into(), "two".into())]);
    }

    #[test]
    fn kubelet_api_flags() {
        let c = load(&[]).unwrap();
        assert_eq!(c.address, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert!(c.enable_server && !c.anonymous_auth && !c.authentication_token_webhook);
        assert_eq!(c.authorization_mode, AuthorizationMode::AlwaysAllow, "standalone has no API server to ask");
        let c = load(&["--address=127.0.0.9", "--anonymous-auth", "--authorization-mode=AlwaysAllow", "--client-ca-file=/ca.crt"]).unwrap();
        assert_eq!(c.address, "127.0.0.9".parse::<IpAddr>().unwrap());
        assert!(c.anonymous_auth);
        assert_eq!(c.client_ca_file, Some(PathBuf::from("/ca.crt")));
        let kubeconfig = temp_file(
            "ok.kubeconfig",
            "apiVersion: v1\nkind: Config\nclusters: [{name: c, cluster: {server: 'https://127.0.0.1:6443'}}]\n\
             contexts: [{name: c, context: {cluster: c, user: u}}]\ncurrent-context: c\nusers: [{name: u, user: {}}]\n",
        );
        let c = load(&["--kubeconfig", kubeconfig.to_str().unwrap()]).unwrap();
        assert!(c.authentication_token_webhook);
        assert_eq!(c.authorization_mode, AuthorizationMode::Webhook);
        let path = temp_file(
            "auth.yaml",
            "kind: KubeletConfiguration\naddress: 127.0.0.7\nauthentication: {x509: {clientCAFile: /x.crt}, anonymous: {enabled: true}}\n\
             authorization: {mode: AlwaysAllow}\n",
        );
        let c = load(&["--config", path.to_str().unwrap(), "--kubeconfig", kubeconfig.to_str().unwrap()]).unwrap();
        assert_eq!(c.address, "127.0.0.7".parse::<IpAddr>().unwrap());
        assert_eq!(c.client_ca_file, Some(PathBuf::from("/x.crt")));
        assert!(c.anonymous_auth);
        assert_eq!(c.authorization_mode, AuthorizationMode::AlwaysAllow);
    }

    #[test]
    fn bad_kubelet_api_flags_are_refused() {
        assert!(err(&["--address=localhost"]).contains("--address"));
        assert!(err(&["--anonymous-auth=sometimes"]).contains("--anonymous-auth"));
        assert!(err(&["--authorization-mode=RBAC"]).contains("Webhook or AlwaysAllow"));
        assert!(err(&["--authorization-mode=Webhook"]).contains("needs --kubeconfig"));
        assert!(err(&["--authentication-token-webhook"]).contains("needs --kubeconfig"));
        assert!(err(&["--tls-cert-file=/a.crt"]).contains("--tls-private-key-file"));
        assert!(err(&["--tls-private-key-file=/a.key"]).contains("--tls-cert-file"));
        assert!(err(&["--healthz-port=65536"]).contains("--healthz-port"));
        let path = temp_file("badauth.yaml", "kind: KubeletConfiguration\nauthorization: {mode: Node}\n");
        assert!(err(&["--config", path.to_str().unwrap()]).contains("--authorization-mode"));
    }

    #[test]
    fn a_bad_node_name_is_refused() {
        let e = Config::load(["wasm-kubelet", "--hostname-override", "Not_A_Name!"]).unwrap_err().to_string();
        assert!(e.contains("--hostname-override"), "{e}");
    }

    #[test]
    fn pause_image_is_accepted_with_a_notice() {
        let c = load(&["--pod-infra-container-image=registry.k8s.io/pause:3.10"]).unwrap();
        assert!(c.notices.iter().any(|n| n.contains("no pause container")));
    }

    #[test]
    fn unreadable_or_broken_kubeconfig_is_refused() {
        let e = err(&["--kubeconfig=/nonexistent/kubeconfig"]);
        assert!(e.starts_with("kubeconfig /nonexistent/kubeconfig:"), "{e}");
        let broken = temp_file("broken.kubeconfig", "clusters: [this is: not valid");
        let e = err(&["--kubeconfig", broken.to_str().unwrap()]);
        assert!(e.starts_with("kubeconfig "), "{e}");
        let empty = temp_file("empty.kubeconfig", "apiVersion: v1\nkind: Config\n");
        assert!(err(&["--kubeconfig", empty.to_str().unwrap()]).contains("no cluster"));
    }

    #[test]
    fn bootstrap_kubeconfig_and_rotation_flags() {
        let bootstrap = temp_file(
            "bootstrap.kubeconfig",
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: https://127.0.0.1:6443}\nusers:\n- name: u\n  user: {token: abcdef.0123456789abcdef}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        );
        let b = bootstrap.to_str().unwrap();
        // --kubeconfig need not exist yet: bootstrap writes it.
        let c = load(&["--bootstrap-kubeconfig", b, "--kubeconfig=/nonexistent/node.kubeconfig", "--rotate-certificates"]).unwrap();
        assert_eq!(c.bootstrap_kubeconfig.as_deref(), Some(bootstrap.as_path()));
        assert_eq!(c.kubeconfig.as_deref(), Some(Path::new("/nonexistent/node.kubeconfig")));
        assert!(c.rotate_certificates && !c.rotate_server_certificates);
        assert!(err(&["--bootstrap-kubeconfig", b]).contains("needs --kubeconfig"));
        let e = err(&["--bootstrap-kubeconfig=/nonexistent/bootstrap", "--kubeconfig=/x"]);
        assert!(e.starts_with("kubeconfig /nonexistent/bootstrap:"), "{e}");
        assert!(err(&["--rotate-certificates"]).contains("needs --kubeconfig"));
        assert!(err(&["--rotate-server-certificates=true"]).contains("needs --kubeconfig"));
        assert!(err(&["--bootstrap-kubeconfig", b, "--kubeconfig=/x", "--rotate-certificates=maybe"]).contains("not a boolean"));
        let e = err(&["--bootstrap-kubeconfig", b, "--kubeconfig=/x", "--rotate-server-certificates", "--tls-cert-file=/a", "--tls-private-key-file=/b"]);
        assert!(e.contains("--tls-cert-file"), "{e}");
        let file = temp_file("rotate.yaml", "kind: KubeletConfiguration\nrotateCertificates: true\nserverTLSBootstrap: true\n");
        let c = load(&["--config", file.to_str().unwrap(), "--bootstrap-kubeconfig", b, "--kubeconfig=/x"]).unwrap();
        assert!(c.rotate_certificates && c.rotate_server_certificates);
        let c = load(&["--config", file.to_str().unwrap(), "--bootstrap-kubeconfig", b, "--kubeconfig=/x", "--rotate-certificates=false"]).unwrap();
        assert!(!c.rotate_certificates, "the flag beats the file");
    }

    #[test]
    fn config_file_is_read_and_flags_win() {
        let path = temp_file(
            "kubelet.yaml",
            "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nmaxPods: 42\nport: 11250\n\
             nodeStatusUpdateFrequency: 4s\nregisterWithTaints:\n- {key: edge, value: \"yes\", effect: NoSchedule}\n\
             evictionHard: {memory.available: 200Mi}\nkubeReserved: {cpu: 250m, memory: 256Mi}\n",
        );
        let c = load(&["--config", path.to_str().unwrap(), "--port", "12250"]).unwrap();
        assert_eq!(c.max_pods, 42);
        assert_eq!(c.port, 12250, "the flag beats the file");
        assert_eq!(c.kube_reserved, Reserved { milli_cpu: 250, memory: 256 << 20, ..Default::default() });
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(4));
        assert_eq!(c.register_with_taints[0].key, "edge");
        assert_eq!(c.eviction_hard, vec![EvictionThreshold { signal: EvictionSignal::MemoryAvailable, limit: ThresholdValue::Quantity(200 << 20) }]);
    }

    #[test]
    fn pod_egress_deny_cidrs_from_the_flag_or_the_file() {
        assert!(load(&[]).unwrap().pod_egress_deny_cidrs.is_empty());
        let c = load(&["--pod-egress-deny-cidrs", "10.0.0.0/8, 127.0.0.1,fd00::/8,10.1.2.3/16"]).unwrap();
        assert_eq!(c.pod_egress_deny_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8", "10.1.0.0/16"]);
        let e = err(&["--pod-egress-deny-cidrs", "10.0.0.0/8,10.0.0.0/33"]);
        assert!(e.contains("--pod-egress-deny-cidrs") && e.contains("10.0.0.0/33"), "{e}");
        assert!(err(&["--pod-egress-deny-cidrs", "etcd"]).contains("not a CIDR"));
        let path = temp_file("deny.yaml", "kind: KubeletConfiguration\npodEgressDenyCIDRs: [192.0.2.0/24, \"::1\"]\n");
        let c = load(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(c.pod_egress_deny_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), ["192.0.2.0/24", "::1/128"]);
        let c = load(&["--config", path.to_str().unwrap(), "--pod-egress-deny-cidrs="]).unwrap();
        assert!(c.pod_egress_deny_cidrs.is_empty(), "the flag beats the file, even empty");
        let c = load(&["--pod-egress-allow-cidrs", "169.254.20.10"]).unwrap();
        assert_eq!(c.pod_egress_allow_cidrs.iter().map(ToString::to_string).collect::<Vec<_>>(), ["169.254.20.10/32"]);
        assert!(err(&["--pod-egress-allow-cidrs", "x/8"]).contains("--pod-egress-allow-cidrs"));
    }

    #[test]
    fn config_file_errors_name_the_file_and_field() {
        let path = temp_file("typo.yaml", "kind: KubeletConfiguration\nmaxPodz: 3\n");
        let e = err(&["--config", path.to_str().unwrap()]);
        assert!(e.contains("typo.yaml") && e.contains("maxPodz"), "{e}");
        let path = temp_file("kind.yaml", "kind: Pod\n");
        assert!(err(&["--config", path.to_str().unwrap()]).contains("KubeletConfiguration"));
        assert!(err(&["--config", "/nonexistent.yaml"]).contains("/nonexistent.yaml"));
        let path = temp_file("badval.yaml", "kind: KubeletConfiguration\nfileCheckFrequency: often\n");
        assert!(err(&["--config", path.to_str().unwrap()]).contains("--file-check-frequency"));
    }

    #[test]
    fn durations_follow_go() {
        assert_eq!(parse_duration("1h2m3s").unwrap(), Duration::from_secs(3723));
        assert_eq!(parse_duration("250ms").unwrap(), Duration::from_millis(250));
        assert_eq!(parse_duration("1.5s").unwrap(), Duration::from_millis(1500));
        assert_eq!(parse_duration("0").unwrap(), Duration::ZERO);
        assert!(parse_duration("5").is_err());
        assert!(parse_duration("5d").is_err());
        assert!(parse_duration("-5s").is_err());
    }

    #[test]
    fn quantities_and_percentages() {
        assert_eq!(ThresholdValue::Percent(10.0).absolute(1000), 100);
        let c = load(&["--eviction-hard=memory.available<67108864001m,nodefs.available<1e3"]).unwrap();
        assert_eq!(c.eviction_hard[0].limit, ThresholdValue::Quantity(67_108_865), "rounded up as the kubelet reads it");
        assert_eq!(c.eviction_hard[1].limit, ThresholdValue::Quantity(1000));
        assert!(err(&["--eviction-hard=memory.available<12Xi"]).contains("--eviction-hard"));
        assert!(err(&["--eviction-hard=memory.available<-1Mi"]).contains("negative"));
    }

    #[test]
    fn reserved_resources_parse_and_bad_ones_name_the_flag() {
        let c = load(&["--system-reserved=cpu=0.5,memory=1Gi,ephemeral-storage=2Gi,pid=100", "--kube-reserved", "cpu=100m"]).unwrap();
        assert_eq!(c.system_reserved, Reserved { milli_cpu: 500, memory: 1 << 30, ephemeral_storage: 2 << 30, pid: 100 });
        assert_eq!(c.kube_reserved, Reserved { milli_cpu: 100, ..Default::default() });
        assert_eq!(load(&[]).unwrap().system_reserved, Reserved::default());
        assert!(err(&["--system-reserved=gpu=1"]).contains("--system-reserved"));
        assert!(err(&["--kube-reserved=memory"]).contains("--kube-reserved"));
        assert!(err(&["--kube-reserved=cpu=lots"]).contains("is not a quantity"));
        assert_eq!(load(&["--kube-reserved=cpu=1e-1,memory=0.5Gi"]).unwrap().kube_reserved, Reserved { milli_cpu: 100, memory: 512 << 20, ..Default::default() });
    }

    #[test]
    fn the_wasm_runtime_is_a_process_apart_unless_running_once() {
        let c = load(&[]).unwrap();
        assert_eq!(c.wasm_runtime, WasmRuntimeMode::Spawn);
        assert_eq!(c.wasm_runtime_endpoint, PathBuf::from("/var/lib/wasm-kubelet/runtime/wasm-runtime.sock"));
        let c = load(&["--wasm-runtime=external", "--wasm-runtime-endpoint=/run/wk.sock"]).unwrap();
        assert_eq!((c.wasm_runtime, c.wasm_runtime_endpoint), (WasmRuntimeMode::External, PathBuf::from("/run/wk.sock")));
        assert_eq!(load(&["--wasm-runtime=in-agent"]).unwrap().wasm_runtime, WasmRuntimeMode::InAgent);
        assert_eq!(load(&["--runonce", "--wasm-runtime=spawn"]).unwrap().wasm_runtime, WasmRuntimeMode::InAgent, "nothing outlives a run-once agent");
    }
}
