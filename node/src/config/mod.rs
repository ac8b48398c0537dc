//! Flags and the `--config` file, merged and checked into one [`Config`] before anything starts.
//!
//! Names and defaults follow the kubelet. Precedence, as in the kubelet: a flag given on the
//! command line beats the KubeletConfiguration file, which beats the default. Every problem is
//! one [`ConfigError`] whose `Display` is a single line naming the flag or field at fault.
//!
//! Configuration as data, in four steps ([`Config::load`]): `flags.rs` parses every flag to its
//! type (clap); `file.rs` reads the file into typed fields that hold the defaults where the file
//! is silent (serde); `Config::overlay` takes each flag over the file's value; `validate.rs`
//! checks the rules between settings. A flag and its file key share one parser (`values.rs`),
//! so a value is refused for the same reason wherever it came from.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::Deserialize;

mod file;
mod flags;
mod validate;
mod values;

pub use flags::Flags;
pub use values::parse_duration;

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
const DEFAULT_IMAGE_PULL_PROGRESS_DEADLINE: Duration =
    provider_wasmtime::image::DEFAULT_PULL_PROGRESS_DEADLINE;
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
    InvalidValue {
        flag: String,
        value: String,
        reason: String,
    },
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

/// How the agent writes its own log lines on stderr (`--logging-format`, `logging.format`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub enum LogFormat {
    /// One human-readable line per event (the kubelet's `text`).
    #[default]
    Text,
    /// One JSON object per line: `timestamp`, `level`, `target`, the event's fields and
    /// `message` at the top level (the kubelet's `json`; its key names are not klog's).
    Json,
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
    /// The pods' memory against the node's allocatable (the kubelet's
    /// `allocatableMemory.available`): not configured, derived from each hard `memory.available`
    /// threshold ([`crate::eviction::thresholds`]).
    AllocatableMemoryAvailable,
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
            Self::AllocatableMemoryAvailable => "allocatableMemory.available",
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
    /// `--registry-config-dir` (`registryConfigDir`): per-registry hosts.toml files (read and
    /// checked by main).
    pub registry_config_dir: Option<PathBuf>,
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
    /// `--container-runtime-endpoint` / containerRuntimeEndpoint: containerd's socket; `None`:
    /// a Wasm-only node.
    pub container_runtime_endpoint: Option<PathBuf>,
    /// `--pod-cidr` / podCIDR (the Node's `spec.podCIDR` wins when it has one: main.rs).
    pub pod_cidr: Option<ipnet::IpNet>,
    /// `--pod-network-gateway` / podNetworkGateway: container pods route beyond the node.
    pub pod_network_gateway: bool,
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
    /// Graceful node shutdown on SIGTERM: zero (the default) leaves the pods running and exits.
    pub shutdown_grace_period: Duration,
    /// The last part of `shutdown_grace_period`, for critical pods (at most all of it).
    pub shutdown_grace_period_critical_pods: Duration,
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
    /// `--logging-format` (`logging.format`).
    pub logging_format: LogFormat,
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
        let flags = Flags::parse_args(args)?;
        let file = match &flags.config {
            Some(path) => file::read(path)?,
            None => file::KubeletConfiguration::default(),
        };
        validate::supported(&flags, &file)?;
        let config = Self::overlay(flags, file);
        validate::validate(&config)?;
        // TLS bootstrap: --kubeconfig is where the node's credentials are written when it is
        // missing or unusable, so then it is checked at start-up (certificates::client), not here.
        match (&config.bootstrap_kubeconfig, &config.kubeconfig) {
            (Some(bootstrap), _) => check_kubeconfig(bootstrap)?,
            (None, Some(kubeconfig)) => check_kubeconfig(kubeconfig)?,
            (None, None) => {}
        }
        Ok(config)
    }

    /// Each setting: the flag if given, else the file's value (which is the default where the
    /// file is silent). Flag-only settings take their defaults here.
    fn overlay(flags: Flags, file: file::KubeletConfiguration) -> Self {
        let mut notices = Vec::new();
        if let Some(image) = &flags.pod_infra_container_image {
            notices.push(format!("--pod-infra-container-image={image} is ignored: wasm-kubelet has no pause container"));
        }
        let root_dir = flags
            .root_dir
            .unwrap_or_else(|| PathBuf::from(DEFAULT_ROOT_DIR));
        let runonce = flags.runonce.unwrap_or(false);
        let kubeconfig = flags.kubeconfig;
        let node_status_update_frequency = flags
            .node_status_update_frequency
            .unwrap_or(file.node_status_update_frequency);
        let manifest_url_header = if flags.manifest_url_header.is_empty() {
            file.static_pod_url_header
        } else {
            flags.manifest_url_header
        };
        Self {
            node_name: flags
                .hostname_override
                .map_or_else(hostname, |name| name.trim().to_string())
                .to_lowercase(),
            cert_dir: flags.cert_dir.unwrap_or_else(|| root_dir.join("pki")),
            bootstrap_kubeconfig: flags.bootstrap_kubeconfig,
            rotate_certificates: flags
                .rotate_certificates
                .unwrap_or(file.rotate_certificates),
            rotate_server_certificates: flags
                .rotate_server_certificates
                .unwrap_or(file.server_tls_bootstrap),
            pod_logs_dir: flags.pod_logs_dir.unwrap_or(file.pod_logs_dir),
            node_ip: flags.node_ip,
            provider_id: flags.provider_id.or(file.provider_id),
            register_node: flags.register_node.unwrap_or(file.register_node),
            register_with_taints: flags
                .register_with_taints
                .unwrap_or(file.register_with_taints),
            node_labels: flags.node_labels.unwrap_or_default(),
            node_status_update_frequency,
            node_status_report_frequency: file
                .node_status_report_frequency
                .max(node_status_update_frequency),
            node_lease_duration: file.node_lease_duration,
            pod_manifest_path: flags.pod_manifest_path.or(file.static_pod_path),
            manifest_url: flags.manifest_url.or(file.static_pod_url),
            manifest_url_header,
            file_check_frequency: flags
                .file_check_frequency
                .unwrap_or(file.file_check_frequency),
            http_check_frequency: flags
                .http_check_frequency
                .unwrap_or(file.http_check_frequency),
            sync_frequency: flags.sync_frequency.unwrap_or(file.sync_frequency),
            runonce,
            // Nothing outlives a run-once agent.
            wasm_runtime: if runonce {
                WasmRuntimeMode::InAgent
            } else {
                flags.wasm_runtime.unwrap_or(WasmRuntimeMode::Spawn)
            },
            wasm_runtime_endpoint: flags
                .wasm_runtime_endpoint
                .unwrap_or_else(|| root_dir.join("runtime").join("wasm-runtime.sock")),
            enable_server: flags.enable_server.unwrap_or(file.enable_server),
            port: flags.port.unwrap_or(file.port),
            healthz_port: flags.healthz_port.unwrap_or(file.healthz_port),
            address: flags.address.unwrap_or(file.address),
            tls_cert_file: flags.tls_cert_file.or(file.tls_cert_file),
            tls_private_key_file: flags.tls_private_key_file.or(file.tls_private_key_file),
            client_ca_file: flags
                .client_ca_file
                .or(file.authentication.x509.client_ca_file),
            anonymous_auth: flags
                .anonymous_auth
                .unwrap_or(file.authentication.anonymous.enabled),
            // Standalone there is no API server to send TokenReviews and SubjectAccessReviews to.
            authentication_token_webhook: flags
                .authentication_token_webhook
                .or(file.authentication.webhook.enabled)
                .unwrap_or(kubeconfig.is_some()),
            authorization_mode: flags
                .authorization_mode
                .or(file.authorization.mode)
                .unwrap_or(if kubeconfig.is_some() {
                    AuthorizationMode::Webhook
                } else {
                    AuthorizationMode::AlwaysAllow
                }),
            housekeeping_interval: flags
                .housekeeping_interval
                .unwrap_or(file.housekeeping_interval),
            image_pull_progress_deadline: flags
                .image_pull_progress_deadline
                .unwrap_or(file.image_pull_progress_deadline),
            streaming_connection_idle_timeout: flags
                .streaming_connection_idle_timeout
                .unwrap_or(file.streaming_connection_idle_timeout),
            registry_ca_file: flags.registry_ca_file,
            registry_config_dir: flags.registry_config_dir.or(file.registry_config_dir),
            insecure_registries: flags
                .insecure_registries
                .unwrap_or(file.insecure_registries),
            max_module_size: flags.max_module_size.unwrap_or(file.max_module_size),
            max_layer_uncompressed_size: flags
                .max_layer_uncompressed_size
                .unwrap_or(file.max_layer_uncompressed_size),
            pod_egress_deny_cidrs: flags
                .pod_egress_deny_cidrs
                .unwrap_or(file.pod_egress_deny_cidrs),
            pod_egress_allow_cidrs: flags
                .pod_egress_allow_cidrs
                .unwrap_or(file.pod_egress_allow_cidrs),
            max_pods: flags.max_pods.unwrap_or(file.max_pods),
            container_runtime_endpoint: flags
                .container_runtime_endpoint
                .or(file.container_runtime_endpoint),
            pod_cidr: flags.pod_cidr.or(file.pod_cidr),
            pod_network_gateway: flags
                .pod_network_gateway
                .unwrap_or(file.pod_network_gateway),
            system_reserved: flags.system_reserved.unwrap_or(file.system_reserved),
            kube_reserved: flags.kube_reserved.unwrap_or(file.kube_reserved),
            eviction_hard: flags.eviction_hard.unwrap_or(file.eviction_hard),
            eviction_soft: flags.eviction_soft.unwrap_or(file.eviction_soft),
            eviction_soft_grace_period: flags
                .eviction_soft_grace_period
                .unwrap_or(file.eviction_soft_grace_period),
            eviction_minimum_reclaim: flags
                .eviction_minimum_reclaim
                .unwrap_or(file.eviction_minimum_reclaim),
            eviction_pressure_transition_period: flags
                .eviction_pressure_transition_period
                .unwrap_or(file.eviction_pressure_transition_period),
            // As the kubelet: zero or less means the pod's own grace period.
            eviction_max_pod_grace_period: Duration::from_secs(
                flags
                    .eviction_max_pod_grace_period
                    .unwrap_or(file.eviction_max_pod_grace_period)
                    .max(0) as u64,
            ),
            shutdown_grace_period: flags
                .shutdown_grace_period
                .unwrap_or(file.shutdown_grace_period),
            shutdown_grace_period_critical_pods: flags
                .shutdown_grace_period_critical_pods
                .unwrap_or(file.shutdown_grace_period_critical_pods),
            minimum_image_ttl_duration: flags
                .minimum_image_ttl_duration
                .unwrap_or(file.image_minimum_gc_age),
            maximum_dead_containers_per_container: flags
                .maximum_dead_containers_per_container
                .unwrap_or(DEFAULT_MAXIMUM_DEAD_CONTAINERS_PER_CONTAINER),
            maximum_dead_containers: flags
                .maximum_dead_containers
                .unwrap_or(DEFAULT_MAXIMUM_DEAD_CONTAINERS),
            minimum_container_ttl_duration: flags
                .minimum_container_ttl_duration
                .unwrap_or(Duration::ZERO),
            image_gc_period: flags.image_gc_period.unwrap_or(DEFAULT_IMAGE_GC_PERIOD),
            container_gc_period: flags
                .container_gc_period
                .unwrap_or(DEFAULT_CONTAINER_GC_PERIOD),
            image_gc_high_threshold: flags
                .image_gc_high_threshold
                .unwrap_or(file.image_gc_high_threshold_percent),
            image_gc_low_threshold: flags
                .image_gc_low_threshold
                .unwrap_or(file.image_gc_low_threshold_percent),
            verbosity: flags.verbosity.unwrap_or(0),
            logging_format: flags.logging_format.unwrap_or(file.logging.format),
            kubeconfig,
            root_dir,
            notices,
        }
    }

    /// The kubelet renews its lease every quarter of its duration (10 s for the default 40 s).
    pub fn lease_renew_interval(&self) -> Duration {
        self.node_lease_duration / 4
    }
}

fn invalid(
    flag: &'static str,
    value: impl std::fmt::Display,
    reason: impl Into<String>,
) -> ConfigError {
    ConfigError::InvalidValue {
        flag: flag.into(),
        value: value.to_string(),
        reason: reason.into(),
    }
}

/// Reads and parses the kubeconfig now, so a broken one stops the agent before it starts.
fn check_kubeconfig(path: &Path) -> Result<(), ConfigError> {
    let kubeconfig =
        kube::config::Kubeconfig::read_from(path).map_err(|e| ConfigError::Kubeconfig {
            path: path.into(),
            reason: one_line(&e),
        })?;
    if kubeconfig.clusters.is_empty() {
        return Err(ConfigError::Kubeconfig {
            path: path.into(),
            reason: "it names no cluster".into(),
        });
    }
    Ok(())
}

pub use provider_api::one_line;

fn hostname() -> String {
    std::fs::read_to_string("/proc/sys/kernel/hostname")
        .map(|s| s.trim().to_string())
        .unwrap_or_else(|_| "localhost".into())
}

fn is_dns_label(s: &str) -> bool {
    !s.is_empty()
        && s.len() <= 63
        && s.bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
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
    prefix.is_none_or(is_dns_subdomain)
        && !name.is_empty()
        && name.len() <= 63
        && is_label_value(name)
}

fn is_label_value(s: &str) -> bool {
    s.is_empty()
        || (s.len() <= 63
            && s.bytes()
                .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_' || b == b'.')
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
        let dir =
            std::env::temp_dir().join(format!("wasm-kubelet-config-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        std::fs::File::create(&path)
            .unwrap()
            .write_all(text.as_bytes())
            .unwrap();
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
        assert_eq!(
            c.eviction_hard[0],
            EvictionThreshold {
                signal: EvictionSignal::MemoryAvailable,
                limit: ThresholdValue::Quantity(100 << 20)
            }
        );
    }

    #[test]
    fn eviction_and_gc_flags_have_the_kubelets_defaults_and_are_checked() {
        let c = load(&[]).unwrap();
        assert!(c.eviction_soft.is_empty() && c.eviction_minimum_reclaim.is_empty());
        assert_eq!(
            c.eviction_pressure_transition_period,
            Duration::from_secs(300)
        );
        assert_eq!(c.eviction_max_pod_grace_period, Duration::ZERO);
        assert_eq!(c.minimum_image_ttl_duration, Duration::from_secs(120));
        assert_eq!(
            (
                c.maximum_dead_containers_per_container,
                c.maximum_dead_containers
            ),
            (1, -1)
        );
        assert_eq!(
            (c.image_gc_period, c.container_gc_period),
            (Duration::from_secs(300), Duration::from_secs(60))
        );

        let c = load(&[
            "--eviction-soft=memory.available<1Gi,nodefs.available<15%",
            "--eviction-soft-grace-period=memory.available=1m30s,nodefs.available=2m",
            "--eviction-minimum-reclaim=nodefs.available=5%,memory.available=500Mi",
            "--maximum-dead-containers=-1",
            "--maximum-dead-containers-per-container=2",
        ])
        .unwrap();
        assert_eq!(c.eviction_soft.len(), 2);
        assert_eq!(
            c.eviction_soft_grace_period[&EvictionSignal::MemoryAvailable],
            Duration::from_secs(90)
        );
        assert_eq!(
            c.eviction_minimum_reclaim[&EvictionSignal::NodefsAvailable],
            ThresholdValue::Percent(5.0)
        );
        assert_eq!(
            c.eviction_minimum_reclaim[&EvictionSignal::MemoryAvailable],
            ThresholdValue::Quantity(500 << 20)
        );
        assert_eq!(c.maximum_dead_containers_per_container, 2);

        assert!(err(&["--eviction-soft=memory.available<1Gi"]).contains(
            "grace period must be given for the soft eviction threshold memory.available"
        ));
        assert!(err(&["--eviction-soft-grace-period=memory.free=1m"])
            .contains("--eviction-soft-grace-period"));
        assert!(err(&["--eviction-minimum-reclaim=nodefs.available=lots"])
            .contains("--eviction-minimum-reclaim"));
        assert!(err(&["--container-gc-period=0s"]).contains("--container-gc-period"));
        assert!(err(&["--maximum-dead-containers=many"]).contains("--maximum-dead-containers"));
    }

    #[test]
    fn shutdown_grace_periods_default_to_off_and_are_checked() {
        let c = load(&[]).unwrap();
        assert_eq!(
            (
                c.shutdown_grace_period,
                c.shutdown_grace_period_critical_pods
            ),
            (Duration::ZERO, Duration::ZERO)
        );
        let c = load(&[
            "--shutdown-grace-period=30s",
            "--shutdown-grace-period-critical-pods=10s",
        ])
        .unwrap();
        assert_eq!(
            (
                c.shutdown_grace_period,
                c.shutdown_grace_period_critical_pods
            ),
            (Duration::from_secs(30), Duration::from_secs(10))
        );
        let file = temp_file("shutdown.yaml", "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nshutdownGracePeriod: 1m\nshutdownGracePeriodCriticalPods: 20s\n");
        let c = load(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            (
                c.shutdown_grace_period,
                c.shutdown_grace_period_critical_pods
            ),
            (Duration::from_secs(60), Duration::from_secs(20))
        );
        assert!(err(&["--shutdown-grace-period=soon"]).contains("--shutdown-grace-period"));
        assert!(err(&["--shutdown-grace-period=-5s"]).contains("--shutdown-grace-period"));
        let line = err(&["--shutdown-grace-period-critical-pods=10s"]);
        assert!(
            line.contains("--shutdown-grace-period-critical-pods")
                && line.contains("must not exceed --shutdown-grace-period"),
            "{line}"
        );
        let file = temp_file("shutdown-bad.yaml", "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nshutdownGracePeriod: forever\n");
        assert!(err(&["--config", file.to_str().unwrap()]).contains("--shutdown-grace-period"));
    }

    #[test]
    fn image_pull_flags_have_defaults_and_are_checked() {
        let c = load(&[]).unwrap();
        assert!(
            c.insecure_registries.is_empty(),
            "no registry is plain http unless named"
        );
        assert_eq!(
            (c.max_module_size, c.max_layer_uncompressed_size),
            (256 << 20, 1 << 30)
        );
        assert_eq!(c.image_pull_progress_deadline, Duration::from_secs(60));
        let c = load(&[
            "--insecure-registries=127.0.0.1:5000, registry.lan",
            "--max-module-size=1Mi",
            "--max-layer-uncompressed-size=2Mi",
            "--image-pull-progress-deadline=30s",
        ])
        .unwrap();
        assert_eq!(
            c.insecure_registries,
            vec!["127.0.0.1:5000".to_string(), "registry.lan".to_string()]
        );
        assert_eq!(
            (c.max_module_size, c.max_layer_uncompressed_size),
            (1 << 20, 2 << 20)
        );
        assert_eq!(c.image_pull_progress_deadline, Duration::from_secs(30));
        assert!(
            err(&["--insecure-registries=http://registry.lan"]).contains("--insecure-registries")
        );
        assert!(err(&["--insecure-registries=registry.lan/path"]).contains("--insecure-registries"));
        assert!(err(&["--max-module-size=0"]).contains("--max-module-size"));
        assert!(err(&["--max-module-size=lots"]).contains("--max-module-size"));
        assert!(
            err(&["--max-layer-uncompressed-size=1Xi"]).contains("--max-layer-uncompressed-size")
        );
        assert!(
            err(&["--image-pull-progress-deadline=0s"]).contains("--image-pull-progress-deadline")
        );
        let file = temp_file("pulls.yaml", "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\ninsecureRegistries: [\"127.0.0.1:5000\"]\nmaxModuleSize: 64Mi\n");
        let c = load(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(
            (c.insecure_registries, c.max_module_size),
            (vec!["127.0.0.1:5000".to_string()], 64 << 20)
        );
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
        assert_eq!(
            c.node_labels.get("example.com/tier").map(String::as_str),
            Some("edge")
        );
        assert_eq!(
            c.register_with_taints[1],
            TaintSpec {
                key: "gpu".into(),
                value: None,
                effect: "NoExecute".into()
            }
        );
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
        assert!(
            err(&["--node-status-update-frequency=10"]).contains("--node-status-update-frequency")
        );
        assert!(
            err(&["--node-status-update-frequency=0s"]).contains("--node-status-update-frequency")
        );
        assert!(err(&["--node-labels=novalue"]).contains("--node-labels"));
        assert!(err(&["--register-with-taints=a=b:Sometimes"]).contains("--register-with-taints"));
        assert!(err(&["--eviction-hard=memory.free<1Gi"]).contains("--eviction-hard"));
        assert!(err(&[
            "--image-gc-high-threshold=50",
            "--image-gc-low-threshold=60"
        ])
        .contains("--image-gc-low-threshold"));
        assert!(err(&["--root-dir=relative/dir"]).contains("--root-dir"));
        assert!(err(&["--allowed-unsafe-sysctls=net.core.somaxconn"]).contains("no kernel sysctls"));
        assert!(err(&["--container-runtime-endpoint=tcp://127.0.0.1:1"])
            .contains("only unix sockets are supported"));
        assert!(err(&["--container-runtime-endpoint=unix://relative.sock"])
            .contains("--container-runtime-endpoint"));
        assert!(err(&["--pod-cidr=10.0.0.1"]).contains("--pod-cidr"));
        assert!(err(&["--pod-cidr=10.9.9.0/31"]).contains("too small"));
        assert!(err(&["--runonce=perhaps"]).contains("--runonce"));
        assert!(err(&["--wasm-runtime=shim"]).contains("--wasm-runtime"));
        assert!(err(&["--wasm-runtime-endpoint=relative.sock"]).contains("--wasm-runtime-endpoint"));
        assert!(err(&["--manifest-url-header=NoColon"]).contains("--manifest-url-header"));
        assert!(err(&["--manifest-url=ftp://example.com/pods"]).contains("--manifest-url"));
        assert!(err(&["--streaming-connection-idle-timeout=4"])
            .contains("--streaming-connection-idle-timeout"));
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
        assert_eq!(
            c.pod_manifest_path,
            Some(PathBuf::from("/etc/kubernetes/manifests"))
        );
        assert_eq!(c.file_check_frequency, Duration::from_secs(1));
        assert_eq!(c.http_check_frequency, Duration::from_secs(20));
        assert_eq!(
            c.manifest_url_header,
            vec![
                ("X-Token".into(), "abc".into()),
                ("Accept".into(), "application/yaml".into())
            ]
        );
        assert!(
            !c.notices.iter().any(|n| n.contains("static pods")),
            "{:?}",
            c.notices
        );
        let file = temp_file("static.yaml", "apiVersion: kubelet.config.k8s.io/v1beta1\nkind: KubeletConfiguration\nstaticPodURL: http://127.0.0.1/m\nstaticPodURLHeader: {X-A: [one, two]}\n");
        let c = load(&["--config", file.to_str().unwrap()]).unwrap();
        assert_eq!(c.manifest_url.as_deref(), Some("http://127.0.0.1/m"));
        assert_eq!(
            c.manifest_url_header,
            vec![("X-A".into(), "one".into()), ("X-A".into(), "two".into())]
        );
    }

    #[test]
    fn kubelet_api_flags() {
        let c = load(&[]).unwrap();
        assert_eq!(c.address, "0.0.0.0".parse::<IpAddr>().unwrap());
        assert!(c.enable_server && !c.anonymous_auth && !c.authentication_token_webhook);
        assert_eq!(
            c.authorization_mode,
            AuthorizationMode::AlwaysAllow,
            "standalone has no API server to ask"
        );
        let c = load(&[
            "--address=127.0.0.9",
            "--anonymous-auth",
            "--authorization-mode=AlwaysAllow",
            "--client-ca-file=/ca.crt",
        ])
        .unwrap();
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
        let c = load(&[
            "--config",
            path.to_str().unwrap(),
            "--kubeconfig",
            kubeconfig.to_str().unwrap(),
        ])
        .unwrap();
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
        let path = temp_file(
            "badauth.yaml",
            "kind: KubeletConfiguration\nauthorization: {mode: Node}\n",
        );
        assert!(err(&["--config", path.to_str().unwrap()]).contains("--authorization-mode"));
    }

    #[test]
    fn a_bad_node_name_is_refused() {
        let e = Config::load(["wasm-kubelet", "--hostname-override", "Not_A_Name!"])
            .unwrap_err()
            .to_string();
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
        let c = load(&[
            "--bootstrap-kubeconfig",
            b,
            "--kubeconfig=/nonexistent/node.kubeconfig",
            "--rotate-certificates",
        ])
        .unwrap();
        assert_eq!(c.bootstrap_kubeconfig.as_deref(), Some(bootstrap.as_path()));
        assert_eq!(
            c.kubeconfig.as_deref(),
            Some(Path::new("/nonexistent/node.kubeconfig"))
        );
        assert!(c.rotate_certificates && !c.rotate_server_certificates);
        assert!(err(&["--bootstrap-kubeconfig", b]).contains("needs --kubeconfig"));
        let e = err(&[
            "--bootstrap-kubeconfig=/nonexistent/bootstrap",
            "--kubeconfig=/x",
        ]);
        assert!(e.starts_with("kubeconfig /nonexistent/bootstrap:"), "{e}");
        assert!(err(&["--rotate-certificates"]).contains("needs --kubeconfig"));
        assert!(err(&["--rotate-server-certificates=true"]).contains("needs --kubeconfig"));
        assert!(err(&[
            "--bootstrap-kubeconfig",
            b,
            "--kubeconfig=/x",
            "--rotate-certificates=maybe"
        ])
        .contains("not a boolean"));
        let e = err(&[
            "--bootstrap-kubeconfig",
            b,
            "--kubeconfig=/x",
            "--rotate-server-certificates",
            "--tls-cert-file=/a",
            "--tls-private-key-file=/b",
        ]);
        assert!(e.contains("--tls-cert-file"), "{e}");
        let file = temp_file(
            "rotate.yaml",
            "kind: KubeletConfiguration\nrotateCertificates: true\nserverTLSBootstrap: true\n",
        );
        let c = load(&[
            "--config",
            file.to_str().unwrap(),
            "--bootstrap-kubeconfig",
            b,
            "--kubeconfig=/x",
        ])
        .unwrap();
        assert!(c.rotate_certificates && c.rotate_server_certificates);
        let c = load(&[
            "--config",
            file.to_str().unwrap(),
            "--bootstrap-kubeconfig",
            b,
            "--kubeconfig=/x",
            "--rotate-certificates=false",
        ])
        .unwrap();
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
        assert_eq!(
            c.kube_reserved,
            Reserved {
                milli_cpu: 250,
                memory: 256 << 20,
                ..Default::default()
            }
        );
        assert_eq!(c.node_status_update_frequency, Duration::from_secs(4));
        assert_eq!(c.register_with_taints[0].key, "edge");
        assert_eq!(
            c.eviction_hard,
            vec![EvictionThreshold {
                signal: EvictionSignal::MemoryAvailable,
                limit: ThresholdValue::Quantity(200 << 20)
            }]
        );
    }

    #[test]
    fn a_mixed_node_from_the_flags_or_the_file() {
        let c = load(&[]).unwrap();
        assert!(c.container_runtime_endpoint.is_none() && c.pod_cidr.is_none());
        assert!(!c.pod_network_gateway);
        let c = load(&[
            "--container-runtime-endpoint=unix:///run/containerd/containerd.sock",
            "--pod-cidr=10.244.1.7/24",
        ])
        .unwrap();
        assert_eq!(
            c.container_runtime_endpoint.as_deref(),
            Some(Path::new("/run/containerd/containerd.sock"))
        );
        assert_eq!(c.pod_cidr.unwrap().to_string(), "10.244.1.0/24");
        assert!(!c.pod_network_gateway);
        let path = temp_file(
            "mixed.yaml",
            "kind: KubeletConfiguration\ncontainerRuntimeEndpoint: unix:///run/c.sock\npodCIDR: 10.9.0.0/16\npodNetworkGateway: true\n",
        );
        let c = load(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            c.container_runtime_endpoint.as_deref(),
            Some(Path::new("/run/c.sock"))
        );
        assert_eq!(c.pod_cidr.unwrap().to_string(), "10.9.0.0/16");
        assert!(c.pod_network_gateway);
        let c = load(&["--config", path.to_str().unwrap(), "--pod-cidr=10.8.0.0/16"]).unwrap();
        assert_eq!(c.pod_cidr.unwrap().to_string(), "10.8.0.0/16");
        let bad = temp_file(
            "mixed-bad.yaml",
            "kind: KubeletConfiguration\ncontainerRuntimeEndpoint: /run/c.sock\n",
        );
        let e = err(&["--config", bad.to_str().unwrap()]);
        assert!(e.contains("unix://"), "{e}");
    }

    #[test]
    fn pod_egress_deny_cidrs_from_the_flag_or_the_file() {
        assert!(load(&[]).unwrap().pod_egress_deny_cidrs.is_empty());
        let c = load(&[
            "--pod-egress-deny-cidrs",
            "10.0.0.0/8, 127.0.0.1,fd00::/8,10.1.2.3/16",
        ])
        .unwrap();
        assert_eq!(
            c.pod_egress_deny_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["10.0.0.0/8", "127.0.0.1/32", "fd00::/8", "10.1.0.0/16"]
        );
        let e = err(&["--pod-egress-deny-cidrs", "10.0.0.0/8,10.0.0.0/33"]);
        assert!(
            e.contains("--pod-egress-deny-cidrs") && e.contains("10.0.0.0/33"),
            "{e}"
        );
        assert!(err(&["--pod-egress-deny-cidrs", "etcd"]).contains("not a CIDR"));
        let path = temp_file(
            "deny.yaml",
            "kind: KubeletConfiguration\npodEgressDenyCIDRs: [192.0.2.0/24, \"::1\"]\n",
        );
        let c = load(&["--config", path.to_str().unwrap()]).unwrap();
        assert_eq!(
            c.pod_egress_deny_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["192.0.2.0/24", "::1/128"]
        );
        let c = load(&[
            "--config",
            path.to_str().unwrap(),
            "--pod-egress-deny-cidrs=",
        ])
        .unwrap();
        assert!(
            c.pod_egress_deny_cidrs.is_empty(),
            "the flag beats the file, even empty"
        );
        let c = load(&["--pod-egress-allow-cidrs", "169.254.20.10"]).unwrap();
        assert_eq!(
            c.pod_egress_allow_cidrs
                .iter()
                .map(ToString::to_string)
                .collect::<Vec<_>>(),
            ["169.254.20.10/32"]
        );
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
        let path = temp_file(
            "badval.yaml",
            "kind: KubeletConfiguration\nfileCheckFrequency: often\n",
        );
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
        let c =
            load(&["--eviction-hard=memory.available<67108864001m,nodefs.available<1e3"]).unwrap();
        assert_eq!(
            c.eviction_hard[0].limit,
            ThresholdValue::Quantity(67_108_865),
            "rounded up as the kubelet reads it"
        );
        assert_eq!(c.eviction_hard[1].limit, ThresholdValue::Quantity(1000));
        assert!(err(&["--eviction-hard=memory.available<12Xi"]).contains("--eviction-hard"));
        assert!(err(&["--eviction-hard=memory.available<-1Mi"]).contains("negative"));
    }

    #[test]
    fn reserved_resources_parse_and_bad_ones_name_the_flag() {
        let c = load(&[
            "--system-reserved=cpu=0.5,memory=1Gi,ephemeral-storage=2Gi,pid=100",
            "--kube-reserved",
            "cpu=100m",
        ])
        .unwrap();
        assert_eq!(
            c.system_reserved,
            Reserved {
                milli_cpu: 500,
                memory: 1 << 30,
                ephemeral_storage: 2 << 30,
                pid: 100
            }
        );
        assert_eq!(
            c.kube_reserved,
            Reserved {
                milli_cpu: 100,
                ..Default::default()
            }
        );
        assert_eq!(load(&[]).unwrap().system_reserved, Reserved::default());
        assert!(err(&["--system-reserved=gpu=1"]).contains("--system-reserved"));
        assert!(err(&["--kube-reserved=memory"]).contains("--kube-reserved"));
        assert!(err(&["--kube-reserved=cpu=lots"]).contains("is not a quantity"));
        assert_eq!(
            load(&["--kube-reserved=cpu=1e-1,memory=0.5Gi"])
                .unwrap()
                .kube_reserved,
            Reserved {
                milli_cpu: 100,
                memory: 512 << 20,
                ..Default::default()
            }
        );
    }

    #[test]
    fn the_wasm_runtime_is_a_process_apart_unless_running_once() {
        let c = load(&[]).unwrap();
        assert_eq!(c.wasm_runtime, WasmRuntimeMode::Spawn);
        assert_eq!(
            c.wasm_runtime_endpoint,
            PathBuf::from("/var/lib/wasm-kubelet/runtime/wasm-runtime.sock")
        );
        let c = load(&[
            "--wasm-runtime=external",
            "--wasm-runtime-endpoint=/run/wk.sock",
        ])
        .unwrap();
        assert_eq!(
            (c.wasm_runtime, c.wasm_runtime_endpoint),
            (WasmRuntimeMode::External, PathBuf::from("/run/wk.sock"))
        );
        assert_eq!(
            load(&["--wasm-runtime=in-agent"]).unwrap().wasm_runtime,
            WasmRuntimeMode::InAgent
        );
        assert_eq!(
            load(&["--runonce", "--wasm-runtime=spawn"])
                .unwrap()
                .wasm_runtime,
            WasmRuntimeMode::InAgent,
            "nothing outlives a run-once agent"
        );
    }

    /// One setting of each kind: its default, the file's value over it, the flag's over both.
    #[test]
    fn a_flag_beats_the_file_which_beats_the_default() {
        type Get = fn(&Config) -> String;
        let rows: &[(&str, &str, &str, Get, &str, &str, &str)] = &[
            // (kind, file line, flag, read, default, from the file, from the flag)
            (
                "duration",
                "fileCheckFrequency: 7s",
                "--file-check-frequency=9s",
                |c| format!("{:?}", c.file_check_frequency),
                "20s",
                "7s",
                "9s",
            ),
            (
                "duration",
                "imageMinimumGCAge: 1h",
                "--minimum-image-ttl-duration=30m",
                |c| format!("{:?}", c.minimum_image_ttl_duration),
                "120s",
                "3600s",
                "1800s",
            ),
            (
                "quantity",
                "maxModuleSize: 64Mi",
                "--max-module-size=1Gi",
                |c| c.max_module_size.to_string(),
                "268435456",
                "67108864",
                "1073741824",
            ),
            (
                "quantity",
                "kubeReserved: {cpu: 250m, pid: 1000}",
                "--kube-reserved=memory=1Ki",
                |c| format!("{:?}", c.kube_reserved),
                &format!("{:?}", Reserved::default()),
                &format!(
                    "{:?}",
                    Reserved {
                        milli_cpu: 250,
                        pid: 1000,
                        ..Default::default()
                    }
                ),
                &format!(
                    "{:?}",
                    Reserved {
                        memory: 1024,
                        ..Default::default()
                    }
                ),
            ),
            (
                "number",
                "port: 11250",
                "--port=12250",
                |c| c.port.to_string(),
                "10250",
                "11250",
                "12250",
            ),
            (
                "number",
                "imageGCHighThresholdPercent: 95",
                "--image-gc-high-threshold=90",
                |c| c.image_gc_high_threshold.to_string(),
                "85",
                "95",
                "90",
            ),
            (
                "bool",
                "registerNode: false",
                "--register-node=true",
                |c| c.register_node.to_string(),
                "true",
                "false",
                "true",
            ),
            (
                "bool",
                "enableServer: false",
                "--enable-server",
                |c| c.enable_server.to_string(),
                "true",
                "false",
                "true",
            ),
            (
                "bool",
                "authentication: {anonymous: {enabled: true}}",
                "--anonymous-auth=false",
                |c| c.anonymous_auth.to_string(),
                "false",
                "true",
                "false",
            ),
            (
                "path",
                "registryConfigDir: /etc/wasm-kubelet/certs.d",
                "--registry-config-dir=/srv/certs.d",
                |c| {
                    c.registry_config_dir
                        .as_ref()
                        .map(|p| p.display().to_string())
                        .unwrap_or_default()
                },
                "",
                "/etc/wasm-kubelet/certs.d",
                "/srv/certs.d",
            ),
            (
                "enum",
                "logging: {format: json}",
                "--logging-format=text",
                |c| format!("{:?}", c.logging_format),
                "Text",
                "Json",
                "Text",
            ),
            (
                "list",
                "insecureRegistries: [a.lan, 'b.lan:5000']",
                "--insecure-registries=c.lan",
                |c| c.insecure_registries.join(","),
                "",
                "a.lan,b.lan:5000",
                "c.lan",
            ),
            (
                "list",
                "podEgressAllowCIDRs: [169.254.20.10]",
                "--pod-egress-allow-cidrs=127.0.0.53",
                |c| format!("{:?}", c.pod_egress_allow_cidrs),
                "[]",
                "[169.254.20.10/32]",
                "[127.0.0.53/32]",
            ),
            (
                "list",
                "registerWithTaints: [{key: a, effect: NoSchedule}]",
                "--register-with-taints=b=c:NoExecute",
                |c| {
                    c.register_with_taints
                        .iter()
                        .map(|t| t.key.clone())
                        .collect()
                },
                "",
                "a",
                "b",
            ),
            (
                "map",
                "evictionHard: {memory.available: 1Gi}",
                "--eviction-hard=pid.available<10%",
                |c| {
                    format!(
                        "{:?}",
                        c.eviction_hard.iter().map(|t| t.signal).collect::<Vec<_>>()
                    )
                },
                "[MemoryAvailable, NodefsAvailable, NodefsInodesFree, ImagefsAvailable]",
                "[MemoryAvailable]",
                "[PidAvailable]",
            ),
            (
                "map",
                "evictionMinimumReclaim: {nodefs.available: 5%}",
                "--eviction-minimum-reclaim=memory.available=1Mi",
                |c| format!("{:?}", c.eviction_minimum_reclaim),
                "{}",
                "{NodefsAvailable: Percent(5.0)}",
                "{MemoryAvailable: Quantity(1048576)}",
            ),
            (
                "map",
                "staticPodURLHeader: {X-A: [one]}",
                "--manifest-url-header=X-B:two",
                |c| format!("{:?}", c.manifest_url_header),
                "[]",
                r#"[("X-A", "one")]"#,
                r#"[("X-B", "two")]"#,
            ),
            (
                "enum",
                "authorization: {mode: AlwaysAllow}",
                "--authorization-mode=AlwaysAllow",
                |c| format!("{:?}", c.authorization_mode),
                "AlwaysAllow",
                "AlwaysAllow",
                "AlwaysAllow",
            ),
        ];
        for (i, (kind, line, flag, get, default, from_file, from_flag)) in rows.iter().enumerate() {
            let file = temp_file(
                &format!("precedence-{i}.yaml"),
                &format!("kind: KubeletConfiguration\n{line}\n"),
            );
            let file = file.to_str().unwrap();
            assert_eq!(
                get(&load(&[]).unwrap()),
                *default,
                "{kind} {line}: the default"
            );
            assert_eq!(
                get(&load(&["--config", file]).unwrap()),
                *from_file,
                "{kind} {line}: the file beats the default"
            );
            assert_eq!(
                get(&load(&["--config", file, flag]).unwrap()),
                *from_flag,
                "{kind} {flag}: the flag beats the file"
            );
        }
        // A key set to null is the key left out, as the kubelet's decoding leaves the default.
        let file = temp_file(
            "nulls.yaml",
            "kind: KubeletConfiguration\nenableServer:\nevictionHard: null\nport: 11250\n",
        );
        let c = load(&["--config", file.to_str().unwrap()]).unwrap();
        assert!(
            c.enable_server && c.eviction_hard.len() == 4 && c.port == 11250,
            "{c:?}"
        );
    }

    /// A bad value is one line naming the flag, or the file, the key and the key's flag, with
    /// the value and why; the same value is refused for the same reason either way.
    #[test]
    fn a_bad_value_names_the_flag_or_the_file_key() {
        let rows: &[(&str, &str, &str, &str)] = &[
            // (flag, file line, the line's key as named, why)
            (
                "--file-check-frequency=often",
                "fileCheckFrequency: often",
                "fileCheckFrequency (--file-check-frequency)",
                r#"invalid value "often": want a duration such as 10s, 1m30s or 500ms"#,
            ),
            (
                "--max-module-size=12Xi",
                "maxModuleSize: 12Xi",
                "maxModuleSize (--max-module-size)",
                r#"invalid value "12Xi": "12Xi" is not a quantity"#,
            ),
            (
                "--max-module-size=0",
                "maxModuleSize: '0'",
                "maxModuleSize (--max-module-size)",
                r#"invalid value "0": must be positive"#,
            ),
            (
                "--logging-format=yaml",
                "logging: {format: yaml}",
                "logging.format (--logging-format)",
                r#"invalid value "yaml": must be text or json"#,
            ),
            (
                "--port=70000",
                "port: 70000",
                "port (--port)",
                r#"invalid value "70000": must be between 1 and 65535"#,
            ),
            (
                "--image-gc-low-threshold=101",
                "imageGCLowThresholdPercent: 101",
                "imageGCLowThresholdPercent (--image-gc-low-threshold)",
                r#"invalid value "101": must be between 0 and 100"#,
            ),
            (
                "--register-node=maybe",
                "registerNode: maybe",
                "registerNode (--register-node)",
                "invalid type: string \"maybe\", expected a boolean",
            ),
            (
                "--insecure-registries=http://x",
                "insecureRegistries: ['http://x']",
                "insecureRegistries (--insecure-registries)",
                r#"invalid value "http://x": want host[:port]"#,
            ),
            (
                "--pod-egress-deny-cidrs=10.0.0.0/33",
                "podEgressDenyCIDRs: [10.0.0.0/33]",
                "podEgressDenyCIDRs (--pod-egress-deny-cidrs)",
                r#"invalid value "10.0.0.0/33": not a CIDR"#,
            ),
            (
                "--system-reserved=gpu=1",
                "systemReserved: {gpu: '1'}",
                "systemReserved (--system-reserved)",
                r#"invalid value "gpu=1": unknown resource "gpu""#,
            ),
            (
                "--eviction-soft-grace-period=memory.available=soon",
                "evictionSoftGracePeriod: {memory.available: soon}",
                "evictionSoftGracePeriod (--eviction-soft-grace-period)",
                r#"invalid value "memory.available=soon": want a duration"#,
            ),
            (
                "--register-with-taints=a:Sometimes",
                "registerWithTaints: [{key: a, effect: Sometimes}]",
                "registerWithTaints (--register-with-taints)",
                r#"invalid value "a=:Sometimes": the effect must be"#,
            ),
            (
                "--authorization-mode=RBAC",
                "authorization: {mode: RBAC}",
                "authorization.mode (--authorization-mode)",
                r#"invalid value "RBAC": must be Webhook or AlwaysAllow"#,
            ),
            (
                "--address=localhost",
                "address: localhost",
                "address (--address)",
                r#"invalid value "localhost": not an IP address"#,
            ),
        ];
        for (i, (flag, line, key, why)) in rows.iter().enumerate() {
            let (name, value) = flag.split_once('=').unwrap();
            let e = err(&[flag]);
            // The flag's form: `invalid value "<value>" for --flag: <reason>`, as before.
            if let Some(rest) = why.strip_prefix("invalid value ") {
                let (shown, reason) = rest.split_once(": ").unwrap();
                assert!(
                    e.starts_with(&format!("invalid value {shown} for {name}: {reason}")),
                    "{flag}: {e}"
                );
            } else {
                assert!(e.contains(name) && e.contains(value), "{flag}: {e}");
            }
            let path = temp_file(
                &format!("bad-{i}.yaml"),
                &format!("kind: KubeletConfiguration\n{line}\n"),
            );
            let e = err(&["--config", path.to_str().unwrap()]);
            assert!(
                e.starts_with(&format!("config file {}: {key}: {why}", path.display())),
                "{line}: {e}"
            );
        }
        // Rules between settings name the flag whichever side the values came from.
        let path = temp_file("gc.yaml", "kind: KubeletConfiguration\nimageGCHighThresholdPercent: 50\nimageGCLowThresholdPercent: 60\n");
        assert_eq!(
            err(&["--config", path.to_str().unwrap()]),
            r#"invalid value "60" for --image-gc-low-threshold: must not exceed --image-gc-high-threshold (50)"#
        );
        let c = load(&[
            "--config",
            path.to_str().unwrap(),
            "--image-gc-high-threshold=70",
        ])
        .unwrap();
        assert_eq!(
            (c.image_gc_high_threshold, c.image_gc_low_threshold),
            (70, 60),
            "the flag's value is the one checked"
        );
    }

    /// The keys the parser knows at `path` (`""`: the top level), from serde's own list in its
    /// unknown-field error, so this cannot drift from the struct.
    fn known_keys(path: &[&str]) -> Vec<String> {
        let mut yaml = "noSuchKey: 1".to_string();
        for key in path.iter().rev() {
            yaml = format!("{key}: {{{yaml}}}");
        }
        let file = temp_file(&format!("known-{}.yaml", path.join("-")), &yaml);
        let e = load(&["--config", file.to_str().unwrap()])
            .expect_err("an unknown key is refused")
            .to_string();
        let expected = e
            .split_once("expected one of ")
            .or_else(|| e.split_once("expected "))
            .unwrap_or_else(|| panic!("{e}"))
            .1;
        expected
            .split(", ")
            .map(|k| {
                k.trim_matches(|c: char| c == '`' || c.is_whitespace())
                    .to_string()
            })
            .collect()
    }

    /// deploy/systemd/kubelet-config.yaml, the example the edge install puts in place: the
    /// agent loads it, and it names every key the parser knows and no other.
    #[test]
    fn the_systemd_example_config_loads_and_names_every_key() {
        let path =
            Path::new(env!("CARGO_MANIFEST_DIR")).join("../deploy/systemd/kubelet-config.yaml");
        // With the credentials flags deploy/systemd/install writes (a bootstrap kubeconfig, the
        // kubeconfig the bootstrap will write).
        let bootstrap = temp_file(
            "edge-bootstrap.kubeconfig",
            "apiVersion: v1\nkind: Config\nclusters:\n- name: c\n  cluster: {server: https://127.0.0.1:6443}\nusers:\n- name: u\n  user: {token: abcdef.0123456789abcdef}\ncontexts:\n- name: x\n  context: {cluster: c, user: u}\ncurrent-context: x\n",
        );
        let c = load(&[
            "--config",
            path.to_str().unwrap(),
            "--bootstrap-kubeconfig",
            bootstrap.to_str().unwrap(),
            "--kubeconfig=/nonexistent/kubeconfig",
        ])
        .unwrap();
        assert_eq!(
            c.pod_manifest_path.as_deref(),
            Some(Path::new("/etc/wasm-kubelet/manifests"))
        );
        assert!(c.rotate_certificates);
        assert_eq!(
            c.shutdown_grace_period,
            Duration::ZERO,
            "restarts keep pods"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let example: serde_yaml::Value = serde_yaml::from_str(&text).unwrap();
        let mut missing = Vec::new();
        let mut unknown = Vec::new();
        let nested = [
            vec![],
            vec!["authentication"],
            vec!["authentication", "x509"],
            vec!["authentication", "webhook"],
            vec!["authentication", "anonymous"],
            vec!["authorization"],
            vec!["logging"],
        ];
        for path in &nested {
            let known = known_keys(path);
            assert!(!known.is_empty(), "{path:?}");
            let mut map = &example;
            for key in path {
                map = &map[*key];
            }
            let map = map
                .as_mapping()
                .unwrap_or_else(|| panic!("{path:?} is a map"));
            let named: Vec<String> = map
                .keys()
                .map(|k| k.as_str().unwrap().to_string())
                .collect();
            missing.extend(
                known
                    .iter()
                    .filter(|k| !named.contains(k))
                    .map(|k| format!("{path:?} {k}")),
            );
            unknown.extend(
                named
                    .iter()
                    .filter(|k| !known.contains(k))
                    .map(|k| format!("{path:?} {k}")),
            );
        }
        assert!(
            missing.is_empty(),
            "keys the example leaves out: {missing:?}"
        );
        assert!(
            unknown.is_empty(),
            "keys the parser does not know: {unknown:?}"
        );
    }

    #[test]
    fn every_key_named_with_a_flag_names_a_real_flag() {
        use clap::CommandFactory;
        let command = Flags::command();
        for (key, flag) in file::KEY_FLAGS {
            let long = flag.trim_start_matches("--");
            assert!(
                command.get_arguments().any(|a| a.get_long() == Some(long)),
                "{key}: {flag} is no flag"
            );
        }
        assert_eq!(file::KubeletConfiguration::default().eviction_hard, values::thresholds("memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,imagefs.available<15%").unwrap());
    }
}
