//! The command line: every flag, parsed to its type once, by clap.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::time::Duration;

use clap::Parser;

use super::values::{self, Bad, Cidrs, Names, Taints, Thresholds};
use super::{
    AuthorizationMode, ConfigError, EvictionSignal, LogFormat, Reserved, ThresholdValue,
    WasmRuntimeMode,
};

/// `--version`: the crate's version and, when built from a git checkout, the commit (build.rs).
pub const VERSION: &str = env!("WASM_KUBELET_VERSION");

// The `--help` headings, the areas of the kubelet's own documentation, in the order a user
// setting up a node goes through them. Every flag is under one (tests/tests/cli.rs checks).
pub const GENERAL: &str = "General";
pub const CLUSTER: &str = "Cluster connection and node credentials";
pub const NODE: &str = "Node identity and registration";
pub const PODS: &str = "Pods and static pods";
pub const RESOURCES: &str = "Resources and eviction";
pub const GC: &str = "Image and container garbage collection";
pub const IMAGES: &str = "Images and registries";
pub const RUNTIME: &str = "Runtime (Wasm and containerd)";
pub const NETWORK: &str = "Pod network and egress";
pub const SERVER: &str = "Kubelet API server (TLS, authentication, authorization)";
pub const SHUTDOWN: &str = "Shutdown";
pub const LOGGING: &str = "Logging and debugging";

const AFTER_HELP: &str = "Flags override the --config file's keys; both are the kubelet's unless \
the help says \"wasm-kubelet's own\".
`wasm-kubelet runtime <flags>` runs the Wasm runtime process alone (the guests' process; see \
--wasm-runtime=external and deploy/systemd).";

/// The command line, each value parsed to its type by clap with the function its file key
/// uses too (values.rs). Every field is optional, so a flag given beats the file and the default.
#[derive(Debug, Default, Parser)]
#[command(
    name = "wasm-kubelet",
    version = VERSION,
    about = "A kubelet for WebAssembly workloads.",
    disable_help_flag = true,
    disable_version_flag = true,
    after_help = AFTER_HELP
)]
pub struct Flags {
    /// Print this help and exit.
    #[arg(help_heading = GENERAL, short = 'h', long, action = clap::ArgAction::Help)]
    pub help: Option<bool>,
    /// Print the version (and the git commit it was built from) and exit.
    #[arg(help_heading = GENERAL, short = 'V', long, action = clap::ArgAction::Version)]
    pub version: Option<bool>,
    /// A KubeletConfiguration (kubelet.config.k8s.io/v1beta1) YAML file; flags override it.
    #[arg(help_heading = GENERAL, long, value_name = "PATH")]
    pub config: Option<PathBuf>,
    /// The agent's state directory [default: /var/lib/wasm-kubelet].
    #[arg(help_heading = GENERAL, long, value_name = "DIR")]
    pub root_dir: Option<PathBuf>,
    /// kubeconfig with the node's credentials; without it the agent runs standalone.
    #[arg(help_heading = CLUSTER, long, value_name = "PATH")]
    pub kubeconfig: Option<PathBuf>,
    /// kubeconfig used to request a client certificate when --kubeconfig does not exist yet.
    #[arg(help_heading = CLUSTER, long, value_name = "PATH")]
    pub bootstrap_kubeconfig: Option<PathBuf>,
    /// Directory for TLS certificates (default <root-dir>/pki).
    #[arg(help_heading = CLUSTER, long, value_name = "DIR")]
    pub cert_dir: Option<PathBuf>,
    /// Rotate the client certificate before it expires, by CSR with the current identity
    /// (KubeletConfiguration rotateCertificates) [default: false].
    #[arg(help_heading = CLUSTER, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub rotate_certificates: Option<bool>,
    /// Get the kubelet API's serving certificate by CSR (kubernetes.io/kubelet-serving) and
    /// renew it; self-signed until one is approved (KubeletConfiguration serverTLSBootstrap)
    /// [default: false].
    #[arg(help_heading = CLUSTER, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub rotate_server_certificates: Option<bool>,
    /// Use this name for the node instead of the hostname.
    #[arg(help_heading = NODE, long, value_name = "NAME")]
    pub hostname_override: Option<String>,
    /// The node's IP address (its InternalIP and every pod's IP).
    #[arg(help_heading = NODE, long, value_name = "IP", value_parser = values::ip)]
    pub node_ip: Option<IpAddr>,
    /// Set as the Node's spec.providerID.
    #[arg(help_heading = NODE, long, value_name = "ID")]
    pub provider_id: Option<String>,
    /// Register the node with the API server [default: true].
    #[arg(help_heading = NODE, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub register_node: Option<bool>,
    /// Taints to register with: key=value:Effect,...
    #[arg(help_heading = NODE, long, value_name = "TAINTS", value_parser = values::taints)]
    pub register_with_taints: Option<Taints>,
    /// Labels to add at registration: key=value,...
    #[arg(help_heading = NODE, long, value_name = "LABELS", value_parser = values::labels)]
    pub node_labels: Option<BTreeMap<String, String>>,
    /// How often the node status is computed and, if changed, posted [default: 10s].
    #[arg(help_heading = NODE, long, value_name = "DURATION", value_parser = values::duration)]
    pub node_status_update_frequency: Option<Duration>,
    /// Where container logs go, as `<dir>/<ns>_<pod>_<uid>/<container>/<n>.log` (the
    /// KubeletConfiguration field podLogsDir) [default: /var/log/pods].
    #[arg(help_heading = PODS, long, value_name = "DIR")]
    pub pod_logs_dir: Option<PathBuf>,
    /// Directory of static pod manifests.
    #[arg(help_heading = PODS, long, value_name = "DIR")]
    pub pod_manifest_path: Option<PathBuf>,
    /// URL serving static pod manifests.
    #[arg(help_heading = PODS, long, value_name = "URL", value_parser = values::manifest_url)]
    pub manifest_url: Option<String>,
    /// A header sent with every --manifest-url request, `Key:Value`; repeatable.
    #[arg(help_heading = PODS, long, value_name = "KEY:VALUE", value_parser = values::header)]
    pub manifest_url_header: Vec<(String, String)>,
    /// How often the static pod directory is rescanned [default: 20s].
    #[arg(help_heading = PODS, long, value_name = "DURATION", value_parser = values::duration)]
    pub file_check_frequency: Option<Duration>,
    /// How often the manifest URL is fetched [default: 20s].
    #[arg(help_heading = PODS, long, value_name = "DURATION", value_parser = values::duration)]
    pub http_check_frequency: Option<Duration>,
    /// How often running pods' configMap, secret, downwardAPI and projected volumes are
    /// refreshed [default: 1m].
    #[arg(help_heading = PODS, long, value_name = "DURATION", value_parser = values::duration)]
    pub sync_frequency: Option<Duration>,
    /// Run the static pods once, then exit.
    #[arg(help_heading = PODS, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub runonce: Option<bool>,
    /// Refused: Wasm pods have no sysctls.
    #[arg(help_heading = PODS, long, value_name = "LIST", value_parser = values::names)]
    pub allowed_unsafe_sysctls: Option<Names>,
    /// Accepted and ignored: there is no pause container.
    #[arg(help_heading = PODS, long, value_name = "IMAGE")]
    pub pod_infra_container_image: Option<String>,
    /// How often node resources are measured [default: 10s].
    #[arg(help_heading = RESOURCES, long, value_name = "DURATION", value_parser = values::duration)]
    pub housekeeping_interval: Option<Duration>,
    /// Most pods this node runs; its pods capacity [default: 110].
    #[arg(help_heading = RESOURCES, long, value_name = "N", value_parser = values::whole)]
    pub max_pods: Option<u32>,
    /// Resources kept for the OS and system daemons, taken from allocatable:
    /// cpu=100m,memory=1Gi,ephemeral-storage=1Gi,pid=1000 [default: none].
    #[arg(help_heading = RESOURCES, long, value_name = "RESOURCES", value_parser = values::reserved)]
    pub system_reserved: Option<Reserved>,
    /// Resources kept for Kubernetes daemons (this agent), taken from allocatable; same form
    /// as --system-reserved [default: none].
    #[arg(help_heading = RESOURCES, long, value_name = "RESOURCES", value_parser = values::reserved)]
    pub kube_reserved: Option<Reserved>,
    /// Hard eviction thresholds: signal<quantity|percent,...
    #[arg(help_heading = RESOURCES, long, value_name = "THRESHOLDS", value_parser = values::thresholds)]
    pub eviction_hard: Option<Thresholds>,
    /// Soft eviction thresholds: signal<quantity|percent,... (each needs a grace period).
    #[arg(help_heading = RESOURCES, long, value_name = "THRESHOLDS", value_parser = values::thresholds)]
    pub eviction_soft: Option<Thresholds>,
    /// How long a soft threshold must hold before pods are evicted: signal=duration,...
    #[arg(help_heading = RESOURCES, long, value_name = "GRACE_PERIODS", value_parser = values::grace_periods)]
    pub eviction_soft_grace_period: Option<BTreeMap<EvictionSignal, Duration>>,
    /// How much past its threshold a signal must recover before pressure ends: signal=quantity|percent,...
    #[arg(help_heading = RESOURCES, long, value_name = "RECLAIMS", value_parser = values::reclaims)]
    pub eviction_minimum_reclaim: Option<BTreeMap<EvictionSignal, ThresholdValue>>,
    /// How long a pressure condition stays after its threshold stops being met [default: 5m].
    #[arg(help_heading = RESOURCES, long, value_name = "DURATION", value_parser = values::duration)]
    pub eviction_pressure_transition_period: Option<Duration>,
    /// Longest grace period (seconds) a pod gets when a soft threshold evicts it; 0 uses the pod's own [default: 0].
    #[arg(help_heading = RESOURCES, long, value_name = "SECONDS", value_parser = values::seconds)]
    pub eviction_max_pod_grace_period: Option<i64>,
    /// An unused image younger than this is never garbage-collected [default: 2m].
    #[arg(help_heading = GC, long, value_name = "DURATION", value_parser = values::duration)]
    pub minimum_image_ttl_duration: Option<Duration>,
    /// Dead instances kept per container (-1: no limit) [default: 1].
    #[arg(help_heading = GC, long, value_name = "N", allow_hyphen_values = true, value_parser = values::count)]
    pub maximum_dead_containers_per_container: Option<i32>,
    /// Dead instances kept on the node (-1: no limit) [default: -1].
    #[arg(help_heading = GC, long, value_name = "N", allow_hyphen_values = true, value_parser = values::count)]
    pub maximum_dead_containers: Option<i32>,
    /// A dead container younger than this is never garbage-collected [default: 0].
    #[arg(help_heading = GC, long, value_name = "DURATION", value_parser = values::duration)]
    pub minimum_container_ttl_duration: Option<Duration>,
    /// How often images are garbage-collected (wasm-kubelet's own; the kubelet's fixed period) [default: 5m].
    #[arg(help_heading = GC, long, value_name = "DURATION", value_parser = values::duration)]
    pub image_gc_period: Option<Duration>,
    /// How often dead containers are garbage-collected (wasm-kubelet's own; the kubelet's fixed period) [default: 1m].
    #[arg(help_heading = GC, long, value_name = "DURATION", value_parser = values::duration)]
    pub container_gc_period: Option<Duration>,
    /// Disk usage percent that starts image garbage collection [default: 85].
    #[arg(help_heading = GC, long, value_name = "PERCENT", value_parser = values::percent)]
    pub image_gc_high_threshold: Option<u8>,
    /// Disk usage percent image garbage collection frees down to [default: 80].
    #[arg(help_heading = GC, long, value_name = "PERCENT", value_parser = values::percent)]
    pub image_gc_low_threshold: Option<u8>,
    /// Cancel an image pull that makes no progress for this long [default: 1m].
    #[arg(help_heading = IMAGES, long, value_name = "DURATION", value_parser = values::duration)]
    pub image_pull_progress_deadline: Option<Duration>,
    /// PEM bundle of extra CA certificates trusted for image registries' TLS, besides the
    /// built-in web PKI roots (wasm-kubelet's own flag: the kubelet leaves this to the runtime).
    #[arg(help_heading = IMAGES, long, value_name = "PATH")]
    pub registry_ca_file: Option<PathBuf>,
    /// Registries (host[:port], comma-separated) that may be spoken to over plain http when
    /// https fails; no other registry ever is, loopback ones included (wasm-kubelet's own flag:
    /// the kubelet leaves this to the runtime) [default: none].
    #[arg(help_heading = IMAGES, long, value_name = "HOSTS", value_parser = values::registries)]
    pub insecure_registries: Option<Names>,
    /// A directory of per-registry hosts in containerd's layout, `<registry>/hosts.toml` (and
    /// `_default/hosts.toml`): mirrors tried before the registry's server, with their own CA,
    /// skip_verify and plain http; shared by Wasm and container pods (wasm-kubelet's own flag;
    /// containerd's `config_path`) [default: none].
    #[arg(help_heading = IMAGES, long, value_name = "DIR")]
    pub registry_config_dir: Option<PathBuf>,
    /// The largest Wasm module an image may hold (a quantity, e.g. 256Mi); a larger one is
    /// refused before it is downloaded and never compiled [default: 256Mi].
    #[arg(help_heading = IMAGES, long, value_name = "QUANTITY", value_parser = values::size)]
    pub max_module_size: Option<u64>,
    /// The most one tar layer of an ordinary OCI image may inflate to while the module is
    /// searched for in it (decompression bombs) [default: 1Gi].
    #[arg(help_heading = IMAGES, long, value_name = "QUANTITY", value_parser = values::size)]
    pub max_layer_uncompressed_size: Option<u64>,
    /// Where the Wasm guests run: `spawn` (a runtime process apart from the agent, started by
    /// the agent when none answers on --wasm-runtime-endpoint; it outlives agent restarts),
    /// `external` (such a process started by the host, e.g. its own systemd unit; the agent
    /// waits for it) or `in-agent` (inside the agent: every agent restart stops every pod;
    /// what --runonce uses) (wasm-kubelet's own flag) [default: spawn].
    #[arg(help_heading = RUNTIME, long, value_name = "MODE", value_parser = values::wasm_runtime)]
    pub wasm_runtime: Option<WasmRuntimeMode>,
    /// The Unix socket the Wasm runtime serves the agent on [default: <root-dir>/runtime/wasm-runtime.sock].
    #[arg(help_heading = RUNTIME, long, value_name = "PATH")]
    pub wasm_runtime_endpoint: Option<PathBuf>,
    /// containerd's socket, unix:///path: Linux container pods run through it beside Wasm pods (a mixed node) [default: none, Wasm only].
    #[arg(help_heading = RUNTIME, long, value_name = "ENDPOINT", value_parser = values::unix_endpoint)]
    pub container_runtime_endpoint: Option<std::path::PathBuf>,
    /// Comma-separated CIDRs (or addresses) no pod may reach, by socket or outgoing HTTP, e.g.
    /// the API server's etcd or the node's own daemons (wasm-kubelet's own flag;
    /// KubeletConfiguration podEgressDenyCIDRs) [default: none]. Link-local and the node's
    /// loopback outside the pod's own ports are refused whatever this says.
    #[arg(help_heading = NETWORK, long, value_name = "CIDRS", value_parser = values::cidrs)]
    pub pod_egress_deny_cidrs: Option<Cidrs>,
    /// Comma-separated CIDRs of link-local or loopback addresses pods may reach all the same,
    /// e.g. NodeLocal DNSCache's 169.254.20.10 or a node-local proxy (wasm-kubelet's own flag;
    /// KubeletConfiguration podEgressAllowCIDRs) [default: none]. The deny list and the pod's
    /// allowed-outbound-hosts still apply.
    #[arg(help_heading = NETWORK, long, value_name = "CIDRS", value_parser = values::cidrs)]
    pub pod_egress_allow_cidrs: Option<Cidrs>,
    /// The node's pod CIDR for container pods' IPs (the Node's spec.podCIDR wins when set) [default: none].
    #[arg(help_heading = NETWORK, long, value_name = "CIDR", value_parser = values::cidr)]
    pub pod_cidr: Option<ipnet::IpNet>,
    /// Let container pods route beyond the node: the bridge is their default gateway and IP forwarding is turned on (wasm-kubelet's own) [default: false].
    #[arg(help_heading = NETWORK, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub pod_network_gateway: Option<bool>,
    /// Serve the kubelet API [default: true].
    #[arg(help_heading = SERVER, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub enable_server: Option<bool>,
    /// Port of the kubelet API, published on the Node [default: 10250].
    #[arg(help_heading = SERVER, long, value_name = "PORT", value_parser = values::port)]
    pub port: Option<u16>,
    /// Port of the plain /healthz endpoint on loopback; 0 disables it [default: 10248].
    #[arg(help_heading = SERVER, long, value_name = "PORT", value_parser = values::port_or_zero)]
    pub healthz_port: Option<u16>,
    /// IP address the kubelet API listens on (0.0.0.0 or :: for every address) [default: 0.0.0.0].
    #[arg(help_heading = SERVER, long, value_name = "IP", value_parser = values::ip)]
    pub address: Option<IpAddr>,
    /// PEM serving certificate (and chain) for the kubelet API; without it a self-signed one is
    /// made, or reused, in --cert-dir as kubelet.crt/kubelet.key.
    #[arg(help_heading = SERVER, long, value_name = "PATH")]
    pub tls_cert_file: Option<PathBuf>,
    /// PEM private key of --tls-cert-file.
    #[arg(help_heading = SERVER, long, value_name = "PATH")]
    pub tls_private_key_file: Option<PathBuf>,
    /// PEM CA bundle: client certificates signed by it authenticate to the kubelet API as their
    /// CN (user) and O (groups).
    #[arg(help_heading = SERVER, long, value_name = "PATH")]
    pub client_ca_file: Option<PathBuf>,
    /// Serve unauthenticated kubelet API requests as system:anonymous [default: false]. The
    /// kubelet defaults to true and relies on deployers to turn it off; this agent refuses them
    /// (401) unless asked, because its API reads container logs and will run commands.
    #[arg(help_heading = SERVER, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub anonymous_auth: Option<bool>,
    /// Authenticate bearer tokens on the kubelet API with TokenReview [default: true with a
    /// --kubeconfig; standalone has no API server to ask].
    #[arg(help_heading = SERVER, long, value_name = "BOOL", num_args = 0..=1, default_missing_value = "true", value_parser = values::boolean)]
    pub authentication_token_webhook: Option<bool>,
    /// How kubelet API requests are authorized: Webhook (SubjectAccessReview) or AlwaysAllow
    /// [default: Webhook with a --kubeconfig, AlwaysAllow standalone].
    #[arg(help_heading = SERVER, long, value_name = "MODE", value_parser = values::authorization_mode)]
    pub authorization_mode: Option<AuthorizationMode>,
    /// Close an exec, attach or port-forward session after this long without traffic in either
    /// direction; 0 never closes one (KubeletConfiguration streamingConnectionIdleTimeout)
    /// [default: 4h].
    #[arg(help_heading = SERVER, long, value_name = "DURATION", value_parser = values::duration)]
    pub streaming_connection_idle_timeout: Option<Duration>,
    /// On SIGTERM, stop every pod (regular ones first) within this period, then exit; 0 leaves the pods running [default: 0].
    #[arg(help_heading = SHUTDOWN, long, value_name = "DURATION", value_parser = values::duration)]
    pub shutdown_grace_period: Option<Duration>,
    /// The part of --shutdown-grace-period kept for critical pods, stopped last [default: 0].
    #[arg(help_heading = SHUTDOWN, long, value_name = "DURATION", value_parser = values::duration)]
    pub shutdown_grace_period_critical_pods: Option<Duration>,
    /// Log verbosity, as the kubelet's -v: 0-3 info, 4-5 debug, 6+ trace.
    #[arg(help_heading = LOGGING, short = 'v', long = "v", value_name = "LEVEL")]
    pub verbosity: Option<u8>,
    /// How the agent's own log lines are written on stderr: text or json (one object per line) [default: text].
    #[arg(help_heading = LOGGING, long, value_name = "FORMAT", value_parser = values::log_format)]
    pub logging_format: Option<LogFormat>,
}

impl Flags {
    /// Parses the command line (`args` includes the program name). A value clap's parser
    /// refuses is `invalid value "<value>" for --flag: <reason>`, as every other.
    pub fn parse_args<I, T>(args: I) -> Result<Self, ConfigError>
    where
        I: IntoIterator<Item = T>,
        T: Into<std::ffi::OsString> + Clone,
    {
        Self::try_parse_from(args).map_err(|e| {
            use clap::error::{ContextKind, ContextValue, ErrorKind};
            if let (Some(bad), Some(ContextValue::String(arg))) = (
                std::error::Error::source(&e).and_then(|s| s.downcast_ref::<Bad>()),
                e.get(ContextKind::InvalidArg),
            ) {
                // `arg` is `--flag <VALUE_NAME>`.
                let flag = arg.split(' ').next().unwrap_or(arg).to_string();
                return ConfigError::InvalidValue {
                    flag,
                    value: bad.value.clone(),
                    reason: bad.reason.clone(),
                };
            }
            let text = e.render().to_string();
            match e.kind() {
                ErrorKind::DisplayHelp | ErrorKind::DisplayVersion => {
                    ConfigError::HelpRequested(text)
                }
                // clap renders usage help after the error; the user gets the first line only.
                _ => ConfigError::Usage(
                    text.lines()
                        .next()
                        .unwrap_or("bad command line")
                        .trim_start_matches("error: ")
                        .to_string(),
                ),
            }
        })
    }
}
