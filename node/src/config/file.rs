//! The `--config` file: the subset of KubeletConfiguration (kubelet.config.k8s.io/v1beta1)
//! this agent reads, as typed fields with the defaults filled in. Every value is parsed by the
//! function its flag uses (values.rs); a key this agent does not know is an error, so a typo
//! never silently does nothing. A bad value is one line naming the file, the key and its flag.

use std::collections::BTreeMap;
use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::time::Duration;

use serde::de::{Deserialize, Deserializer, Error as _};

use super::values::{self, Bad, Cidrs, Names, Taints, Thresholds};
use super::*;

/// The KubeletConfiguration keys read, each with its default: a key the file leaves out keeps
/// it; a flag given on the command line beats both (see `Config::load`).
#[derive(Debug, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct KubeletConfiguration {
    pub api_version: Option<String>,
    pub kind: Option<String>,
    pub static_pod_path: Option<PathBuf>,
    pub pod_logs_dir: PathBuf,
    #[serde(rename = "staticPodURL", deserialize_with = "de::manifest_url")]
    pub static_pod_url: Option<String>,
    #[serde(rename = "staticPodURLHeader", deserialize_with = "de::headers")]
    pub static_pod_url_header: Vec<(String, String)>,
    #[serde(deserialize_with = "de::duration")]
    pub file_check_frequency: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub http_check_frequency: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub sync_frequency: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub node_status_update_frequency: Duration,
    /// At least nodeStatusUpdateFrequency, whatever the file says.
    #[serde(deserialize_with = "de::duration")]
    pub node_status_report_frequency: Duration,
    #[serde(rename = "nodeLeaseDurationSeconds", deserialize_with = "de::seconds")]
    pub node_lease_duration: Duration,
    pub enable_server: bool,
    #[serde(deserialize_with = "de::port")]
    pub port: u16,
    #[serde(deserialize_with = "de::port_or_zero")]
    pub healthz_port: u16,
    pub max_pods: u32,
    #[serde(deserialize_with = "de::reserved")]
    pub system_reserved: Reserved,
    #[serde(deserialize_with = "de::reserved")]
    pub kube_reserved: Reserved,
    #[serde(deserialize_with = "de::thresholds")]
    pub eviction_hard: Thresholds,
    #[serde(deserialize_with = "de::thresholds")]
    pub eviction_soft: Thresholds,
    #[serde(deserialize_with = "de::grace_periods")]
    pub eviction_soft_grace_period: BTreeMap<EvictionSignal, Duration>,
    #[serde(deserialize_with = "de::reclaims")]
    pub eviction_minimum_reclaim: BTreeMap<EvictionSignal, ThresholdValue>,
    #[serde(deserialize_with = "de::duration")]
    pub eviction_pressure_transition_period: Duration,
    /// Seconds; zero or less: the pod's own grace period.
    pub eviction_max_pod_grace_period: i64,
    /// Graceful node shutdown on SIGTERM (zero: off, the pods outlive the agent).
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace_period: Duration,
    /// The part of `shutdownGracePeriod` kept for critical pods.
    #[serde(deserialize_with = "de::duration")]
    pub shutdown_grace_period_critical_pods: Duration,
    #[serde(rename = "imageMinimumGCAge", deserialize_with = "de::duration")]
    pub image_minimum_gc_age: Duration,
    #[serde(
        rename = "imageGCHighThresholdPercent",
        deserialize_with = "de::percent"
    )]
    pub image_gc_high_threshold_percent: u8,
    #[serde(
        rename = "imageGCLowThresholdPercent",
        deserialize_with = "de::percent"
    )]
    pub image_gc_low_threshold_percent: u8,
    #[serde(deserialize_with = "de::duration")]
    pub image_pull_progress_deadline: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub streaming_connection_idle_timeout: Duration,
    #[serde(deserialize_with = "de::duration")]
    pub housekeeping_interval: Duration,
    pub register_node: bool,
    #[serde(deserialize_with = "de::taints")]
    pub register_with_taints: Taints,
    #[serde(rename = "providerID")]
    pub provider_id: Option<String>,
    /// Refused unless empty (validate.rs).
    pub allowed_unsafe_sysctls: Names,
    #[serde(deserialize_with = "de::ip")]
    pub address: IpAddr,
    pub tls_cert_file: Option<PathBuf>,
    pub tls_private_key_file: Option<PathBuf>,
    pub rotate_certificates: bool,
    #[serde(rename = "serverTLSBootstrap")]
    pub server_tls_bootstrap: bool,
    pub authentication: Authentication,
    pub authorization: Authorization,
    pub logging: Logging,
    // wasm-kubelet's own keys (see the flags of the same names).
    #[serde(deserialize_with = "de::registries")]
    pub insecure_registries: Names,
    pub registry_config_dir: Option<PathBuf>,
    #[serde(deserialize_with = "de::size")]
    pub max_module_size: u64,
    #[serde(deserialize_with = "de::size")]
    pub max_layer_uncompressed_size: u64,
    #[serde(rename = "podEgressDenyCIDRs", deserialize_with = "de::cidrs")]
    pub pod_egress_deny_cidrs: Cidrs,
    #[serde(rename = "podEgressAllowCIDRs", deserialize_with = "de::cidrs")]
    pub pod_egress_allow_cidrs: Cidrs,
    /// `--container-runtime-endpoint` (the kubelet's key).
    #[serde(deserialize_with = "de::endpoint")]
    pub container_runtime_endpoint: Option<PathBuf>,
    /// `--pod-cidr` (the kubelet's key).
    #[serde(rename = "podCIDR", deserialize_with = "de::cidr")]
    pub pod_cidr: Option<ipnet::IpNet>,
    /// `--pod-network-gateway` (wasm-kubelet's own).
    pub pod_network_gateway: bool,
}

/// KubeletConfiguration `authentication` (the subset read).
#[derive(Debug, Default, Deserialize)]
#[serde(rename_all = "camelCase", deny_unknown_fields, default)]
pub(super) struct Authentication {
    pub x509: X509,
    pub webhook: Enabled,
    pub anonymous: Anonymous,
}

#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct X509 {
    #[serde(rename = "clientCAFile")]
    pub client_ca_file: Option<PathBuf>,
}

/// `authentication.webhook`; unset: on with a kubeconfig (there is an API server to ask).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Enabled {
    pub enabled: Option<bool>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Anonymous {
    pub enabled: bool,
}

impl Default for Anonymous {
    fn default() -> Self {
        Self {
            enabled: DEFAULT_ANONYMOUS_AUTH,
        }
    }
}

/// KubeletConfiguration `logging` (the subset read: `format`).
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Logging {
    #[serde(deserialize_with = "de::log_format")]
    pub format: LogFormat,
}

/// KubeletConfiguration `authorization`; unset mode: Webhook with a kubeconfig, else AlwaysAllow.
#[derive(Debug, Default, Deserialize)]
#[serde(deny_unknown_fields, default)]
pub(super) struct Authorization {
    #[serde(deserialize_with = "de::authorization_mode")]
    pub mode: Option<AuthorizationMode>,
}

impl Default for KubeletConfiguration {
    /// The defaults of every key, the kubelet's unless the constant says otherwise.
    fn default() -> Self {
        Self {
            api_version: None,
            kind: None,
            static_pod_path: None,
            pod_logs_dir: PathBuf::from(DEFAULT_POD_LOGS_DIR),
            static_pod_url: None,
            static_pod_url_header: Vec::new(),
            file_check_frequency: DEFAULT_FILE_CHECK_FREQUENCY,
            http_check_frequency: DEFAULT_HTTP_CHECK_FREQUENCY,
            sync_frequency: DEFAULT_SYNC_FREQUENCY,
            node_status_update_frequency: DEFAULT_NODE_STATUS_UPDATE_FREQUENCY,
            node_status_report_frequency: DEFAULT_NODE_STATUS_REPORT_FREQUENCY,
            node_lease_duration: DEFAULT_NODE_LEASE_DURATION,
            enable_server: true,
            port: DEFAULT_PORT,
            healthz_port: DEFAULT_HEALTHZ_PORT,
            max_pods: DEFAULT_MAX_PODS,
            system_reserved: Reserved::default(),
            kube_reserved: Reserved::default(),
            eviction_hard: default_eviction_hard(),
            eviction_soft: Vec::new(),
            eviction_soft_grace_period: BTreeMap::new(),
            eviction_minimum_reclaim: BTreeMap::new(),
            eviction_pressure_transition_period: DEFAULT_EVICTION_PRESSURE_TRANSITION_PERIOD,
            eviction_max_pod_grace_period: 0,
            shutdown_grace_period: Duration::ZERO,
            shutdown_grace_period_critical_pods: Duration::ZERO,
            image_minimum_gc_age: DEFAULT_MINIMUM_IMAGE_TTL,
            image_gc_high_threshold_percent: DEFAULT_IMAGE_GC_HIGH,
            image_gc_low_threshold_percent: DEFAULT_IMAGE_GC_LOW,
            image_pull_progress_deadline: DEFAULT_IMAGE_PULL_PROGRESS_DEADLINE,
            streaming_connection_idle_timeout: DEFAULT_STREAMING_CONNECTION_IDLE_TIMEOUT,
            housekeeping_interval: DEFAULT_HOUSEKEEPING_INTERVAL,
            register_node: true,
            register_with_taints: Vec::new(),
            provider_id: None,
            allowed_unsafe_sysctls: Vec::new(),
            address: DEFAULT_ADDRESS,
            tls_cert_file: None,
            tls_private_key_file: None,
            rotate_certificates: false,
            server_tls_bootstrap: false,
            authentication: Authentication::default(),
            authorization: Authorization::default(),
            logging: Logging::default(),
            insecure_registries: Vec::new(),
            registry_config_dir: None,
            max_module_size: provider_wasmtime::image::DEFAULT_MAX_MODULE_SIZE,
            max_layer_uncompressed_size:
                provider_wasmtime::image::DEFAULT_MAX_LAYER_UNCOMPRESSED_SIZE,
            pod_egress_deny_cidrs: Vec::new(),
            pod_egress_allow_cidrs: Vec::new(),
            container_runtime_endpoint: None,
            pod_cidr: None,
            pod_network_gateway: false,
        }
    }
}

/// The kubelet's hard eviction defaults on Linux:
/// `memory.available<100Mi,nodefs.available<10%,nodefs.inodesFree<5%,imagefs.available<15%`.
fn default_eviction_hard() -> Thresholds {
    use EvictionSignal::*;
    use ThresholdValue::*;
    [
        (MemoryAvailable, Quantity(100 << 20)),
        (NodefsAvailable, Percent(10.0)),
        (NodefsInodesFree, Percent(5.0)),
        (ImagefsAvailable, Percent(15.0)),
    ]
    .into_iter()
    .map(|(signal, limit)| EvictionThreshold { signal, limit })
    .collect()
}

/// The flag of each key whose value can be refused, named with it in the error.
pub(super) const KEY_FLAGS: &[(&str, &str)] = &[
    ("podLogsDir", "--pod-logs-dir"),
    ("staticPodURL", "--manifest-url"),
    ("staticPodURLHeader", "--manifest-url-header"),
    ("fileCheckFrequency", "--file-check-frequency"),
    ("httpCheckFrequency", "--http-check-frequency"),
    ("syncFrequency", "--sync-frequency"),
    (
        "nodeStatusUpdateFrequency",
        "--node-status-update-frequency",
    ),
    ("enableServer", "--enable-server"),
    ("port", "--port"),
    ("healthzPort", "--healthz-port"),
    ("maxPods", "--max-pods"),
    ("systemReserved", "--system-reserved"),
    ("kubeReserved", "--kube-reserved"),
    ("evictionHard", "--eviction-hard"),
    ("evictionSoft", "--eviction-soft"),
    ("evictionSoftGracePeriod", "--eviction-soft-grace-period"),
    ("evictionMinimumReclaim", "--eviction-minimum-reclaim"),
    (
        "evictionPressureTransitionPeriod",
        "--eviction-pressure-transition-period",
    ),
    (
        "evictionMaxPodGracePeriod",
        "--eviction-max-pod-grace-period",
    ),
    ("shutdownGracePeriod", "--shutdown-grace-period"),
    (
        "shutdownGracePeriodCriticalPods",
        "--shutdown-grace-period-critical-pods",
    ),
    ("imageMinimumGCAge", "--minimum-image-ttl-duration"),
    ("imageGCHighThresholdPercent", "--image-gc-high-threshold"),
    ("imageGCLowThresholdPercent", "--image-gc-low-threshold"),
    (
        "imagePullProgressDeadline",
        "--image-pull-progress-deadline",
    ),
    (
        "streamingConnectionIdleTimeout",
        "--streaming-connection-idle-timeout",
    ),
    ("housekeepingInterval", "--housekeeping-interval"),
    ("registerNode", "--register-node"),
    ("registerWithTaints", "--register-with-taints"),
    ("providerID", "--provider-id"),
    ("allowedUnsafeSysctls", "--allowed-unsafe-sysctls"),
    ("address", "--address"),
    ("tlsCertFile", "--tls-cert-file"),
    ("tlsPrivateKeyFile", "--tls-private-key-file"),
    ("rotateCertificates", "--rotate-certificates"),
    ("serverTLSBootstrap", "--rotate-server-certificates"),
    ("authentication.x509.clientCAFile", "--client-ca-file"),
    (
        "authentication.webhook.enabled",
        "--authentication-token-webhook",
    ),
    ("authentication.anonymous.enabled", "--anonymous-auth"),
    ("authorization.mode", "--authorization-mode"),
    ("logging.format", "--logging-format"),
    ("insecureRegistries", "--insecure-registries"),
    ("registryConfigDir", "--registry-config-dir"),
    ("maxModuleSize", "--max-module-size"),
    ("maxLayerUncompressedSize", "--max-layer-uncompressed-size"),
    ("podEgressDenyCIDRs", "--pod-egress-deny-cidrs"),
    ("podEgressAllowCIDRs", "--pod-egress-allow-cidrs"),
];

/// The flag of the key at `path` (`registerWithTaints[0].effect` is registerWithTaints').
fn flag_of(path: &str) -> Option<&'static str> {
    let top = path.split(['[', '.']).next().unwrap_or(path);
    KEY_FLAGS
        .iter()
        .find(|(key, _)| *key == path || *key == top)
        .map(|(_, flag)| *flag)
}

/// The text with every `key: null` left out: the kubelet decodes its file with Go's
/// encoding/json, where a null leaves the default, and so does this agent. Read from the text
/// itself (not a `serde_yaml::Value`), a plain scalar such as `pid: 1000` still reads as the
/// string a quantity wants; so the text is written anew only when it holds a null.
fn without_nulls(text: &str) -> Result<std::borrow::Cow<'_, str>, serde_yaml::Error> {
    fn drop_nulls(v: &mut serde_yaml::Value) -> bool {
        match v {
            serde_yaml::Value::Mapping(m) => {
                let before = m.len();
                m.retain(|_, v| !v.is_null());
                let dropped = m.len() != before;
                m.values_mut()
                    .fold(dropped, |dropped, v| drop_nulls(v) | dropped)
            }
            serde_yaml::Value::Sequence(items) => items
                .iter_mut()
                .fold(false, |dropped, v| drop_nulls(v) | dropped),
            _ => false,
        }
    }
    let mut value: serde_yaml::Value = serde_yaml::from_str(text)?;
    if !drop_nulls(&mut value) {
        return Ok(text.into());
    }
    serde_yaml::to_string(&value).map(Into::into)
}

/// `a.b[0].c`, `a.b[0]`, `a.b`, `a`: the key and the keys it is under.
fn key_prefixes(key: &str) -> impl Iterator<Item = &str> {
    std::iter::once(key).chain(
        key.char_indices()
            .rev()
            .filter(|(_, c)| matches!(c, '.' | '['))
            .map(|(i, _)| &key[..i]),
    )
}

/// Reads and checks the file: one line naming the file (and the key, and its flag) if not.
pub(super) fn read(path: &Path) -> Result<KubeletConfiguration, ConfigError> {
    let fail = |reason: String| ConfigError::ConfigFile {
        path: path.into(),
        reason,
    };
    let text = std::fs::read_to_string(path).map_err(|e| fail(e.to_string()))?;
    let text = without_nulls(&text).map_err(|e| fail(e.to_string().replace('\n', " ")))?;
    let file: KubeletConfiguration = serde_path_to_error::deserialize(
        serde_yaml::Deserializer::from_str(&text),
    )
    .map_err(|e| {
        let key = e.path().to_string();
        let inner = e.into_inner();
        let mut message = inner.to_string().replace('\n', " ");
        if key != "." {
            // serde_yaml may name the key (or the map it is in) and the line itself; here the
            // key is named once, in full, with its flag.
            if let Some(rest) =
                key_prefixes(&key).find_map(|prefix| message.strip_prefix(&format!("{prefix}: ")))
            {
                message = rest.to_string();
            }
            if let Some(at) = inner
                .location()
                .map(|l| format!(" at line {} column {}", l.line(), l.column()))
            {
                message = message.strip_suffix(&at).unwrap_or(&message).to_string();
            }
        }
        fail(match flag_of(&key) {
            Some(flag) => format!("{key} ({flag}): {message}"),
            None if key != "." => format!("{key}: {message}"),
            None => message,
        })
    })?;
    if let Some(kind) = &file.kind {
        if kind != "KubeletConfiguration" {
            return Err(fail(format!("kind is {kind:?}, want KubeletConfiguration")));
        }
    }
    if let Some(api_version) = &file.api_version {
        if api_version != "kubelet.config.k8s.io/v1beta1" {
            return Err(fail(format!(
                "apiVersion is {api_version:?}, want kubelet.config.k8s.io/v1beta1"
            )));
        }
    }
    Ok(file)
}

/// serde adapters: each reads the key's YAML form and parses it with the flag's function.
mod de {
    use super::*;

    fn via<'de, D: Deserializer<'de>, T>(
        d: D,
        parse: fn(&str) -> Result<T, Bad>,
    ) -> Result<T, D::Error> {
        parse(&String::deserialize(d)?).map_err(D::Error::custom)
    }

    /// A map `key: value` read as the flag's `key<sep>value,...`.
    fn map_via<'de, D: Deserializer<'de>, T>(
        d: D,
        sep: char,
        parse: fn(&str) -> Result<T, Bad>,
    ) -> Result<T, D::Error> {
        let map = BTreeMap::<String, String>::deserialize(d)?;
        parse(
            &map.iter()
                .map(|(k, v)| format!("{k}{sep}{v}"))
                .collect::<Vec<_>>()
                .join(","),
        )
        .map_err(D::Error::custom)
    }

    pub fn duration<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        via(d, values::duration)
    }

    pub fn seconds<'de, D: Deserializer<'de>>(d: D) -> Result<Duration, D::Error> {
        Ok(Duration::from_secs(u32::deserialize(d)?.into()))
    }

    pub fn port<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        values::port_number(u32::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn port_or_zero<'de, D: Deserializer<'de>>(d: D) -> Result<u16, D::Error> {
        values::port_or_zero_number(u32::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn percent<'de, D: Deserializer<'de>>(d: D) -> Result<u8, D::Error> {
        values::percent_number(u32::deserialize(d)?).map_err(D::Error::custom)
    }

    pub fn size<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        via(d, values::size)
    }

    pub fn ip<'de, D: Deserializer<'de>>(d: D) -> Result<IpAddr, D::Error> {
        via(d, values::ip)
    }

    pub fn manifest_url<'de, D: Deserializer<'de>>(d: D) -> Result<Option<String>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|u| values::manifest_url(&u))
            .transpose()
            .map_err(D::Error::custom)
    }

    pub fn log_format<'de, D: Deserializer<'de>>(d: D) -> Result<LogFormat, D::Error> {
        via(d, values::log_format)
    }

    pub fn authorization_mode<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<AuthorizationMode>, D::Error> {
        Option::<String>::deserialize(d)?
            .map(|m| values::authorization_mode(&m))
            .transpose()
            .map_err(D::Error::custom)
    }

    /// `{Key: [value, ...]}`: one header per value.
    pub fn headers<'de, D: Deserializer<'de>>(d: D) -> Result<Vec<(String, String)>, D::Error> {
        let map = BTreeMap::<String, Vec<String>>::deserialize(d)?;
        Ok(map
            .into_iter()
            .flat_map(|(k, values)| values.into_iter().map(move |v| (k.clone(), v)))
            .collect())
    }

    pub fn reserved<'de, D: Deserializer<'de>>(d: D) -> Result<Reserved, D::Error> {
        map_via(d, '=', values::reserved)
    }

    pub fn thresholds<'de, D: Deserializer<'de>>(d: D) -> Result<Thresholds, D::Error> {
        map_via(d, '<', values::thresholds)
    }

    pub fn grace_periods<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<EvictionSignal, Duration>, D::Error> {
        map_via(d, '=', values::grace_periods)
    }

    pub fn reclaims<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<BTreeMap<EvictionSignal, ThresholdValue>, D::Error> {
        map_via(d, '=', values::reclaims)
    }

    pub fn taints<'de, D: Deserializer<'de>>(d: D) -> Result<Taints, D::Error> {
        Vec::<TaintSpec>::deserialize(d)?
            .into_iter()
            .map(values::taint)
            .collect::<Result<_, _>>()
            .map_err(D::Error::custom)
    }

    /// A list of `host[:port]`; unlike the flag's, an empty entry is refused.
    pub fn registries<'de, D: Deserializer<'de>>(d: D) -> Result<Names, D::Error> {
        Vec::<String>::deserialize(d)?
            .iter()
            .map(|r| values::registry(r.trim()))
            .collect::<Result<_, _>>()
            .map_err(D::Error::custom)
    }

    pub fn cidrs<'de, D: Deserializer<'de>>(d: D) -> Result<Cidrs, D::Error> {
        values::cidrs(&Vec::<String>::deserialize(d)?.join(",")).map_err(D::Error::custom)
    }

    pub fn cidr<'de, D: Deserializer<'de>>(d: D) -> Result<Option<ipnet::IpNet>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => values::cidr(&s).map(Some).map_err(D::Error::custom),
        }
    }

    pub fn endpoint<'de, D: Deserializer<'de>>(
        d: D,
    ) -> Result<Option<std::path::PathBuf>, D::Error> {
        match Option::<String>::deserialize(d)? {
            None => Ok(None),
            Some(s) if s.is_empty() => Ok(None),
            Some(s) => values::unix_endpoint(&s)
                .map(Some)
                .map_err(D::Error::custom),
        }
    }
}
