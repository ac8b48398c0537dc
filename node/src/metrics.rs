//! The agent's own Prometheus metrics, served by the kubelet API on `/metrics` ([`render`]) and
//! `/metrics/probes` ([`render_probes`]). The series are `prometheus-client`'s (atomics, and a
//! map per labelled family), encoded by its Prometheus text format 0.0.4 encoder
//! ([`CONTENT_TYPE`]), not OpenMetrics: no `# EOF`, and a counter's `# HELP`/`# TYPE` lines
//! name it with its `_total`, as client_golang writes them.
//!
//! # Recording (any module)
//!
//! ```
//! use wasm_kubelet::metrics::{self, OperationLabels};
//! // The kubelet's series are defined once, in [`kubelet()`]. A labelled family takes its own
//! // label struct, so a series cannot be recorded with a label missing or out of order.
//! metrics::kubelet().pod_worker_duration.get_or_create(&OperationLabels { operation: "sync" }).observe(0.012);
//! metrics::kubelet().running_pods.set(3);
//! ```
//!
//! A new series: a field in [`KubeletMetrics`] (a `Family` with a label struct deriving
//! `EncodeLabelSet`, fields in the order the labels are written), made and described in
//! [`kubelet_registry`].
//!
//! Why one global set of series (and a second for probes) rather than a handle passed around:
//! the things that record are everywhere (pod workers, the PLEG, the image puller, the API
//! server, probes) and a metric has no owner in the channel sense: it is a set of atomics that
//! only ever grows or is overwritten. Recording costs a read lock to find a labelled child
//! (`get_or_create`); keep a clone (`get_or_create_owned`) where a hot path records the same
//! labels repeatedly, then each record is one or two atomic operations. Unit tests that need
//! exact figures make their own [`kubelet_registry`].
//!
//! A labelled family with no series yet is not served; an unlabelled one is served from the
//! start (zero), as client_golang serves it. Children are never removed, except per-pod series
//! (`prober_probe_total`), which the pod's prober removes when the pod goes.

use std::sync::{Arc, LazyLock};

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::{ConstCounter, Counter};
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::histogram::Histogram;
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

/// Prometheus' default histogram buckets (seconds), which the kubelet uses for its operation
/// timings (`metrics.DefBuckets`).
pub const DEFAULT_BUCKETS: &[f64] = &[
    0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0,
];

/// The kubelet's pod start-up buckets (seconds): round numbers, roughly exponential, up to an
/// hour (`podStartupDurationBuckets` in the kubelet's metrics). Wasm pods start in well under a
/// second, so the first bucket (0.5 s) is where most land.
pub const POD_START_BUCKETS: &[f64] = &[
    0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0,
    300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0,
];

/// Image pull buckets (seconds): from a small module off a local registry to a large one over a
/// slow link.
pub const IMAGE_PULL_BUCKETS: &[f64] = &[
    0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
];

/// The `Content-Type` of [`render`] and [`render_probes`]: the text format 0.0.4.
pub const CONTENT_TYPE: &str = prometheus_client::encoding::prometheus_text::CONTENT_TYPE;

/// client-go's request latency buckets (seconds), `rest_client_request_duration_seconds`.
pub const REST_CLIENT_BUCKETS: &[f64] = &[
    0.005, 0.025, 0.1, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 15.0, 30.0, 60.0,
];

/// A family of histograms, each made with the family's buckets.
pub type HistogramFamily<L> = Family<L, Histogram, fn() -> Histogram>;

/// `kubelet_pod_worker_duration_seconds{operation}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct OperationLabels {
    /// `create`, `update`, `sync` or `kill`.
    pub operation: &'static str,
}

/// `kubelet_running_containers{container_state}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ContainerStateLabels {
    /// `created`, `running` or `exited`.
    pub container_state: &'static str,
}

/// `kubelet_image_pull_duration_seconds{result}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct PullResultLabels {
    /// `success` or `error`.
    pub result: &'static str,
}

/// `rest_client_requests_total{code,method,host}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RestClientLabels {
    /// The response's status code, `<error>` when none came.
    pub code: String,
    pub method: String,
    /// The API server's `host:port`.
    pub host: String,
}

/// `rest_client_request_duration_seconds{verb,host}`, as client-go labels it.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RestClientDurationLabels {
    pub verb: String,
    /// The API server's `host:port`.
    pub host: String,
}

/// The kubelet's runtime operation buckets (seconds), `metrics.ExponentialBuckets(.005, 2.5, 14)`:
/// 5 ms up to about 3 hours.
pub fn runtime_operation_buckets() -> impl Iterator<Item = f64> {
    prometheus_client::metrics::histogram::exponential_buckets(0.005, 2.5, 14)
}

/// `kubelet_runtime_operations_*{operation_type}`: the CRI call's name (`create_container`,
/// `list_containers`, ...), see [`crate::runtime::instrumented`].
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct RuntimeOperationLabels {
    pub operation_type: &'static str,
}

/// `kubelet_node_name{node}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct NodeLabels {
    pub node: String,
}

/// `kubelet_http_requests_total{method,path,server_type,long_running}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct HttpRequestLabels {
    /// `GET`, `POST`, `HEAD` or `other`.
    pub method: &'static str,
    /// The path's first segment, from a fixed list (`other` otherwise).
    pub path: &'static str,
    pub server_type: &'static str,
    /// `true` or `false`.
    pub long_running: &'static str,
}

/// `prober_probe_total{probe_type,result,container,pod,namespace,pod_uid}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
pub struct ProbeLabels {
    /// `Liveness`, `Readiness` or `Startup`.
    pub probe_type: &'static str,
    /// `successful` or `failed`.
    pub result: &'static str,
    pub container: String,
    pub pod: String,
    pub namespace: String,
    pub pod_uid: String,
}

/// The kubelet's own series on `/metrics`, named as the kubelet names them where it has one.
pub struct KubeletMetrics {
    /// `kubelet_pod_start_duration_seconds`: the pod's creation (in the API, or first seen for a
    /// static pod) to the worker observing every container Running. Once per pod UID.
    pub pod_start_duration: Histogram,
    /// `kubelet_pod_worker_duration_seconds{operation}`: one pod sync, `create` (first sync of
    /// a pod), `update` or `sync` (later syncs), `kill` (teardown).
    pub pod_worker_duration: HistogramFamily<OperationLabels>,
    /// `kubelet_pleg_relist_duration_seconds`: one relist of the provider's containers.
    pub pleg_relist_duration: Histogram,
    /// `kubelet_pleg_relist_interval_seconds`: from the start of one relist to the start of
    /// the next (the period, stretched when a relist or the runtime is slow).
    pub pleg_relist_interval: Histogram,
    /// `kubelet_running_pods`: pods with at least one running container (set by the PLEG).
    pub running_pods: Gauge,
    /// `kubelet_running_containers{container_state}`: containers by state
    /// (`created`, `running`, `exited`), set by the PLEG.
    pub running_containers: Family<ContainerStateLabels, Gauge>,
    /// `kubelet_image_pull_duration_seconds{result}`: image pulls, `success` or `error`; the
    /// `_count` series is the number of pulls. (The kubelet labels this by image size.)
    pub image_pull_duration: HistogramFamily<PullResultLabels>,
    /// `rest_client_requests_total{code,method,host}`: requests to the API server by status
    /// code (`<error>` when no response came), as client-go counts them.
    pub rest_client_requests: Family<RestClientLabels, Counter>,
    /// `rest_client_request_duration_seconds{verb,host}`: from sending a request to the API
    /// server to its response's head (or the error), as client-go times it.
    pub rest_client_request_duration: HistogramFamily<RestClientDurationLabels>,
    /// `kubelet_node_name{node}`: always 1.
    pub node_name: Family<NodeLabels, Gauge>,
    /// `kubelet_http_requests_total{method,path,server_type,long_running}`: requests to the
    /// kubelet API that passed authorization, by the path's first segment (`pods`, `exec`, ...).
    pub http_requests: Family<HttpRequestLabels, Counter>,
    /// `kubelet_runtime_operations_total{operation_type}`: calls to the runtimes (the provider
    /// seam), by the CRI call's name.
    pub runtime_operations: Family<RuntimeOperationLabels, Counter>,
    /// `kubelet_runtime_operations_errors_total{operation_type}`: those that failed.
    pub runtime_operations_errors: Family<RuntimeOperationLabels, Counter>,
    /// `kubelet_runtime_operations_duration_seconds{operation_type}`: how long each took.
    pub runtime_operations_duration: HistogramFamily<RuntimeOperationLabels>,
}

/// The kubelet's series, made (and registered for [`render`]) on first use.
pub fn kubelet() -> &'static KubeletMetrics {
    &kubelet_served().0
}

fn kubelet_served() -> &'static (KubeletMetrics, Registry) {
    static KUBELET: LazyLock<(KubeletMetrics, Registry)> = LazyLock::new(|| {
        let (metrics, mut registry) = kubelet_registry();
        registry.register_collector(Box::new(ProcessMetrics));
        (metrics, registry)
    });
    &KUBELET
}

/// A fresh set of the kubelet's series and the registry that describes them (without the
/// `process_*` series).
pub fn kubelet_registry() -> (KubeletMetrics, Registry) {
    let metrics = KubeletMetrics {
        pod_start_duration: Histogram::new(POD_START_BUCKETS.iter().copied()),
        pod_worker_duration: Family::new_with_constructor(|| {
            Histogram::new(DEFAULT_BUCKETS.iter().copied())
        }),
        pleg_relist_duration: Histogram::new(DEFAULT_BUCKETS.iter().copied()),
        pleg_relist_interval: Histogram::new(DEFAULT_BUCKETS.iter().copied()),
        running_pods: Gauge::default(),
        running_containers: Family::default(),
        image_pull_duration: Family::new_with_constructor(|| {
            Histogram::new(IMAGE_PULL_BUCKETS.iter().copied())
        }),
        rest_client_requests: Family::default(),
        rest_client_request_duration: Family::new_with_constructor(|| {
            Histogram::new(REST_CLIENT_BUCKETS.iter().copied())
        }),
        node_name: Family::default(),
        http_requests: Family::default(),
        runtime_operations: Family::default(),
        runtime_operations_errors: Family::default(),
        runtime_operations_duration: Family::new_with_constructor(|| {
            Histogram::new(runtime_operation_buckets())
        }),
    };
    let mut r = Registry::default();
    let m = &metrics;
    // Registered in name order: families are served in registration order, and client_golang
    // (which Prometheus tooling is tested against) sorts them by name.
    describe(
        &mut r,
        "kubelet_http_requests_total",
        "Number of the http requests received since the server started",
        &m.http_requests,
    );
    describe(
        &mut r,
        "kubelet_image_pull_duration_seconds",
        "Duration in seconds to pull an image, by result (success or error)",
        &m.image_pull_duration,
    );
    describe(
        &mut r,
        "kubelet_node_name",
        "The node's name. The count is always 1.",
        &m.node_name,
    );
    describe(
        &mut r,
        "kubelet_pleg_relist_duration_seconds",
        "Duration in seconds for relisting pods in PLEG.",
        &m.pleg_relist_duration,
    );
    describe(
        &mut r,
        "kubelet_pleg_relist_interval_seconds",
        "Interval in seconds between relisting in PLEG.",
        &m.pleg_relist_interval,
    );
    describe(
        &mut r,
        "kubelet_pod_start_duration_seconds",
        "Duration in seconds from the pod's creation (or, for a static pod, the kubelet seeing it) to every container running, as observed by the pod worker",
        &m.pod_start_duration,
    );
    describe(
        &mut r,
        "kubelet_pod_worker_duration_seconds",
        "Duration in seconds to sync a single pod. Broken down by operation type: create, update, sync or kill",
        &m.pod_worker_duration,
    );
    describe(
        &mut r,
        "kubelet_running_containers",
        "Number of containers currently running",
        &m.running_containers,
    );
    describe(
        &mut r,
        "kubelet_running_pods",
        "Number of pods that have a running pod sandbox and a running container",
        &m.running_pods,
    );
    describe(
        &mut r,
        "kubelet_runtime_operations_duration_seconds",
        "Duration in seconds of runtime operations. Broken down by operation type.",
        &m.runtime_operations_duration,
    );
    describe(
        &mut r,
        "kubelet_runtime_operations_errors_total",
        "Cumulative number of runtime operation errors by operation type.",
        &m.runtime_operations_errors,
    );
    describe(
        &mut r,
        "kubelet_runtime_operations_total",
        "Cumulative number of runtime operations by operation type.",
        &m.runtime_operations,
    );
    describe(
        &mut r,
        "rest_client_request_duration_seconds",
        "Request latency in seconds. Broken down by verb, and host.",
        &m.rest_client_request_duration,
    );
    describe(
        &mut r,
        "rest_client_requests_total",
        "Number of HTTP requests to the API server, partitioned by status code, method, and host.",
        &m.rest_client_requests,
    );
    (metrics, r)
}

/// The series on `/metrics/probes`, as the kubelet serves them apart from `/metrics`.
pub struct ProbeMetrics {
    /// `prober_probe_total{probe_type,result,container,pod,namespace,pod_uid}`: probes run, by
    /// result. Removed when the pod's prober goes.
    pub probe_total: Family<ProbeLabels, Counter>,
}

/// The probe series, made (and registered for [`render_probes`]) on first use.
pub fn probes() -> &'static ProbeMetrics {
    &probes_served().0
}

fn probes_served() -> &'static (ProbeMetrics, Registry) {
    static PROBES: LazyLock<(ProbeMetrics, Registry)> = LazyLock::new(|| {
        let metrics = ProbeMetrics {
            probe_total: Family::default(),
        };
        let mut r = Registry::default();
        describe(&mut r, "prober_probe_total", "Cumulative number of a liveness, readiness or startup probe for a container by result.", &metrics.probe_total);
        (metrics, r)
    });
    &PROBES
}

/// `/metrics`: the kubelet's series and this process's `process_*` series.
pub fn render() -> String {
    encode(&kubelet_served().1)
}

/// `/metrics/probes`.
pub fn render_probes() -> String {
    encode(&probes_served().1)
}

/// A registry in the text format 0.0.4.
pub fn encode(registry: &Registry) -> String {
    let mut text = String::new();
    // Writing into a String cannot fail, and no collector here returns an error.
    if let Err(e) = prometheus_client::encoding::prometheus_text::encode(&mut text, registry) {
        tracing::warn!(error = %e, "encoding metrics");
    }
    text
}

/// Registers `metric` under its served `name` and `help`, exactly as given.
///
/// Why a collector rather than `Registry::register`: that one appends a `.` to every help
/// text (the kubelet's are served as the kubelet writes them, some without one). A counter is
/// named here with its `_total`, as it is served; the encoder adds the suffix, so it is taken
/// off the name it is given.
pub(crate) fn describe<M>(
    registry: &mut Registry,
    name: &'static str,
    help: &'static str,
    metric: &M,
) where
    M: EncodeMetric + Clone + std::fmt::Debug + Send + Sync + 'static,
{
    let name = match metric.metric_type() {
        MetricType::Counter => name.strip_suffix("_total").unwrap_or(name),
        _ => name,
    };
    registry.register_collector(Box::new(Described {
        name,
        help,
        metric: metric.clone(),
    }));
}

/// One family, described as served (see [`describe`]).
#[derive(Debug)]
struct Described<M> {
    name: &'static str,
    help: &'static str,
    metric: M,
}

impl<M: EncodeMetric + std::fmt::Debug + Send + Sync + 'static> Collector for Described<M> {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        if self.metric.is_empty() {
            return Ok(());
        }
        let series =
            encoder.encode_descriptor(self.name, self.help, None, self.metric.metric_type())?;
        self.metric.encode(series)
    }
}

/// Records one pod worker pass: `kubelet_pod_worker_duration_seconds{operation}`, and, the
/// first time `status` shows every container running, `kubelet_pod_start_duration_seconds`
/// from the pod's creationTimestamp (or `first_seen`, for a pod without one) to now.
pub fn observe_pod_sync(
    operation: &'static str,
    took: std::time::Duration,
    pod: &k8s_openapi::api::core::v1::Pod,
    status: Option<&k8s_openapi::api::core::v1::PodStatus>,
    first_seen: k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>,
    start_observed: &mut bool,
) {
    let metrics = kubelet();
    metrics
        .pod_worker_duration
        .get_or_create(&OperationLabels { operation })
        .observe(took.as_secs_f64());
    if *start_observed {
        return;
    }
    let Some(status) = status else { return };
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    let all_running = status.phase.as_deref() == Some("Running")
        && !statuses.is_empty()
        && statuses
            .iter()
            .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    if !all_running {
        return;
    }
    *start_observed = true;
    let created = pod
        .metadata
        .creation_timestamp
        .as_ref()
        .map(|t| t.0)
        .unwrap_or(first_seen);
    let seconds = (k8s_openapi::chrono::Utc::now() - created)
        .num_milliseconds()
        .max(0) as f64
        / 1000.0;
    metrics.pod_start_duration.observe(seconds);
}

/// A layer for kube's client stack that counts every API request into
/// `rest_client_requests_total{code,method,host}` (`<error>` when no response came).
#[derive(Clone)]
pub struct CountApiRequests {
    host: Arc<str>,
}

impl CountApiRequests {
    /// `host` is the API server's `host:port`, as client-go labels it.
    pub fn new(host: &str) -> Self {
        CountApiRequests { host: host.into() }
    }
}

impl<S> tower_layer::Layer<S> for CountApiRequests {
    type Service = CountedApiService<S>;
    fn layer(&self, inner: S) -> Self::Service {
        CountedApiService {
            inner,
            host: self.host.clone(),
        }
    }
}

/// The service [`CountApiRequests`] wraps around kube's stack.
#[derive(Clone)]
pub struct CountedApiService<S> {
    inner: S,
    host: Arc<str>,
}

impl<S, B, R> tower_service::Service<http::Request<B>> for CountedApiService<S>
where
    S: tower_service::Service<http::Request<B>, Response = http::Response<R>>,
    S::Future: Send + 'static,
{
    type Response = S::Response;
    type Error = S::Error;
    type Future =
        std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(
        &mut self,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let host = self.host.clone();
        let sent = std::time::Instant::now();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            kubelet()
                .rest_client_request_duration
                .get_or_create(&RestClientDurationLabels {
                    verb: method.clone(),
                    host: host.to_string(),
                })
                .observe(sent.elapsed().as_secs_f64());
            let code = match &response {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            kubelet()
                .rest_client_requests
                .get_or_create(&RestClientLabels {
                    code,
                    method,
                    host: host.to_string(),
                })
                .inc();
            response
        })
    }
}

/// `process_*` series of this process from `/proc/self`, read at scrape time (cheap: two small
/// files and a directory listing): CPU seconds, start time, resident memory, open fds.
#[derive(Debug)]
struct ProcessMetrics;

impl Collector for ProcessMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let sample = ProcessSample::read();
        if let Some(seconds) = sample.cpu_seconds {
            let series = encoder.encode_descriptor(
                "process_cpu_seconds",
                "Total user and system CPU time spent in seconds.",
                None,
                MetricType::Counter,
            )?;
            ConstCounter::new(seconds).encode(series)?;
        }
        if let Some(start) = sample.start_time {
            let series = encoder.encode_descriptor(
                "process_start_time_seconds",
                "Start time of the process since unix epoch in seconds.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(start).encode(series)?;
        }
        if let Some(bytes) = sample.resident_bytes {
            let series = encoder.encode_descriptor(
                "process_resident_memory_bytes",
                "Resident memory size in bytes.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(bytes).encode(series)?;
        }
        if let Some(fds) = sample.open_fds {
            let series = encoder.encode_descriptor(
                "process_open_fds",
                "Number of open file descriptors.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(fds).encode(series)?;
        }
        // The agent's tokio runtime: tasks spawned and not yet finished (a stable, cheap
        // counter of tokio's: one atomic load). A task per pod that never ends shows here as a
        // line that grows with pods served (the soak and tests/tests/soak_smoke.rs read it).
        // No series outside a runtime (a unit test's plain thread).
        if let Ok(runtime) = tokio::runtime::Handle::try_current() {
            let series = encoder.encode_descriptor(
                "wasm_kubelet_tokio_alive_tasks",
                "Number of tasks alive (spawned and not finished) in the agent's tokio runtime.",
                None,
                MetricType::Gauge,
            )?;
            ConstGauge::new(runtime.metrics().num_alive_tasks() as i64).encode(series)?;
        }
        Ok(())
    }
}

/// What [`ProcessMetrics`] serves; `None` where /proc could not say.
#[derive(Debug, Default)]
struct ProcessSample {
    cpu_seconds: Option<f64>,
    start_time: Option<f64>,
    resident_bytes: Option<u64>,
    open_fds: Option<u64>,
}

impl ProcessSample {
    fn read() -> ProcessSample {
        let mut sample = ProcessSample {
            open_fds: std::fs::read_dir("/proc/self/fd")
                .ok()
                .map(|fds| fds.count() as u64),
            ..Default::default()
        };
        // Linux reports times in clock ticks and pages; both sizes come from sysconf.
        // SAFETY: sysconf has no preconditions.
        let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
        let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) }.max(0) as u64;
        let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else {
            return sample;
        };
        // Fields after the command (which may hold spaces) start at the last ')'.
        let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else {
            return sample;
        };
        let fields: Vec<&str> = rest.split_whitespace().collect();
        // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22, rss 24.
        let field = |n: usize| fields.get(n - 3).and_then(|s| s.parse::<u64>().ok());
        if ticks > 0.0 {
            if let (Some(utime), Some(stime)) = (field(14), field(15)) {
                sample.cpu_seconds = Some((utime + stime) as f64 / ticks);
            }
            let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| {
                s.lines()
                    .find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok())
            });
            if let (Some(start), Some(boot)) = (field(22), boot) {
                sample.start_time = Some(boot + start as f64 / ticks);
            }
        }
        sample.resident_bytes = field(24).map(|rss| rss * page);
        sample
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(text: &str) -> Vec<&str> {
        text.lines().collect()
    }

    #[test]
    fn families_keep_their_names_help_types_and_label_order() {
        let (m, r) = kubelet_registry();
        m.rest_client_requests
            .get_or_create(&RestClientLabels {
                code: "200".into(),
                method: "GET".into(),
                host: "h:6443".into(),
            })
            .inc_by(3);
        m.node_name
            .get_or_create(&NodeLabels {
                node: "quote\"back\\slash\nline".into(),
            })
            .set(1);
        m.http_requests
            .get_or_create(&HttpRequestLabels {
                method: "GET",
                path: "pods",
                server_type: "readwrite",
                long_running: "false",
            })
            .inc();
        m.running_pods.set(2);
        m.rest_client_request_duration
            .get_or_create(&RestClientDurationLabels {
                verb: "GET".into(),
                host: "h:6443".into(),
            })
            .observe(0.03);
        m.pleg_relist_interval.observe(1.0);
        let text = encode(&r);
        let l = lines(&text);
        for expected in [
            "# HELP rest_client_requests_total Number of HTTP requests to the API server, partitioned by status code, method, and host.",
            "# TYPE rest_client_requests_total counter",
            "rest_client_requests_total{code=\"200\",method=\"GET\",host=\"h:6443\"} 3",
            "# HELP kubelet_node_name The node's name. The count is always 1.",
            "# TYPE kubelet_node_name gauge",
            "kubelet_node_name{node=\"quote\\\"back\\\\slash\\nline\"} 1",
            "# TYPE kubelet_http_requests_total counter",
            "kubelet_http_requests_total{method=\"GET\",path=\"pods\",server_type=\"readwrite\",long_running=\"false\"} 1",
            "kubelet_running_pods 2",
            "# TYPE rest_client_request_duration_seconds histogram",
            "rest_client_request_duration_seconds_bucket{verb=\"GET\",host=\"h:6443\",le=\"0.025\"} 0",
            "rest_client_request_duration_seconds_bucket{verb=\"GET\",host=\"h:6443\",le=\"0.1\"} 1",
            "# TYPE kubelet_pleg_relist_interval_seconds histogram",
            "kubelet_pleg_relist_interval_seconds_count 1",
            // Unlabelled families are served before anything is recorded.
            "kubelet_pod_start_duration_seconds_count 0",
        ] {
            assert!(l.contains(&expected), "{expected}\n{text}");
        }
        let pod_worker = l
            .iter()
            .position(|x| x.starts_with("# HELP kubelet_pod_worker_duration_seconds"));
        assert!(
            pod_worker.is_none(),
            "a labelled family with no series is not served: {text}"
        );
        // Families in name order, text format 0.0.4 (no OpenMetrics `# EOF`).
        let names: Vec<&str> = l
            .iter()
            .filter_map(|x| x.strip_prefix("# TYPE ")?.split(' ').next())
            .collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
        assert!(
            !text.contains("# EOF") && !text.contains("# UNIT"),
            "{text}"
        );
        assert_eq!(CONTENT_TYPE, "text/plain; version=0.0.4; charset=utf-8");
    }

    #[test]
    fn histograms_are_cumulative_with_their_buckets_sum_and_count() {
        let (m, r) = kubelet_registry();
        let sync = m
            .pod_worker_duration
            .get_or_create_owned(&OperationLabels { operation: "sync" });
        for v in [0.004, 0.1, 0.5, 70.0] {
            sync.observe(v);
        }
        let text = encode(&r);
        let l = lines(&text);
        let buckets: Vec<&str> = l
            .iter()
            .filter_map(|x| {
                x.strip_prefix("kubelet_pod_worker_duration_seconds_bucket{operation=\"sync\",")
            })
            .collect();
        assert_eq!(
            buckets,
            [
                "le=\"0.005\"} 1",
                "le=\"0.01\"} 1",
                "le=\"0.025\"} 1",
                "le=\"0.05\"} 1",
                "le=\"0.1\"} 2",
                "le=\"0.25\"} 2",
                "le=\"0.5\"} 3",
                "le=\"1\"} 3",
                "le=\"2.5\"} 3",
                "le=\"5\"} 3",
                "le=\"10\"} 3",
                "le=\"+Inf\"} 4"
            ],
            "{text}"
        );
        assert!(
            l.contains(&"kubelet_pod_worker_duration_seconds_sum{operation=\"sync\"} 70.604"),
            "{text}"
        );
        assert!(
            l.contains(&"kubelet_pod_worker_duration_seconds_count{operation=\"sync\"} 4"),
            "{text}"
        );
        assert!(l.contains(&"# HELP kubelet_pod_worker_duration_seconds Duration in seconds to sync a single pod. Broken down by operation type: create, update, sync or kill"), "{text}");
        assert!(
            l.contains(&"# TYPE kubelet_pod_worker_duration_seconds histogram"),
            "{text}"
        );
        // The pod start buckets, whole seconds written as integers, as client_golang writes them.
        assert!(
            l.contains(&"kubelet_pod_start_duration_seconds_bucket{le=\"3600\"} 0"),
            "{text}"
        );
        m.image_pull_duration
            .get_or_create(&PullResultLabels { result: "success" })
            .observe(0.2);
        let text = encode(&r);
        assert!(
            text.contains(
                "kubelet_image_pull_duration_seconds_bucket{result=\"success\",le=\"0.25\"} 1\n"
            ),
            "{text}"
        );
        assert!(
            text.contains(
                "kubelet_image_pull_duration_seconds_bucket{result=\"success\",le=\"300\"} 1\n"
            ),
            "{text}"
        );
    }

    #[test]
    fn removed_probe_series_disappear() {
        let family: Family<ProbeLabels, Counter> = Family::default();
        let mut r = Registry::default();
        describe(&mut r, "prober_probe_total", "Probes.", &family);
        let labels = |uid: &str| ProbeLabels {
            probe_type: "Liveness",
            result: "successful",
            container: "c".into(),
            pod: "p".into(),
            namespace: "ns".into(),
            pod_uid: uid.into(),
        };
        family.get_or_create(&labels("u1")).inc();
        family.get_or_create(&labels("u2")).inc();
        family.remove(&labels("u1"));
        let text = encode(&r);
        assert!(!text.contains("u1") && text.contains("prober_probe_total{probe_type=\"Liveness\",result=\"successful\",container=\"c\",pod=\"p\",namespace=\"ns\",pod_uid=\"u2\"} 1\n"), "{text}");
        assert!(
            text.starts_with(
                "# HELP prober_probe_total Probes.\n# TYPE prober_probe_total counter\n"
            ),
            "{text}"
        );
        family.remove(&labels("u2"));
        assert_eq!(encode(&r), "", "a family without series is not served");
    }

    #[test]
    fn process_metrics_read_this_process() {
        let mut r = Registry::default();
        r.register_collector(Box::new(ProcessMetrics));
        let text = encode(&r);
        let value = |name: &str| {
            text.lines()
                .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse::<f64>().ok())
        };
        assert!(
            value("process_resident_memory_bytes").is_some_and(|v| v > 0.0),
            "{text}"
        );
        assert!(value("process_open_fds").is_some_and(|v| v > 0.0), "{text}");
        assert!(value("process_cpu_seconds_total").is_some(), "{text}");
        assert!(
            value("process_start_time_seconds").is_some_and(|v| v > 1.0e9),
            "{text}"
        );
        assert!(
            text.contains("# TYPE process_cpu_seconds_total counter\n"),
            "{text}"
        );
        assert!(
            !text.contains("wasm_kubelet_tokio_alive_tasks"),
            "no runtime, no task series: {text}"
        );
    }

    #[test]
    fn alive_tasks_counts_the_runtime_tasks_that_have_not_finished() {
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut r = Registry::default();
        r.register_collector(Box::new(ProcessMetrics));
        let alive = |r: &Registry| {
            let text = encode(r);
            text.lines()
                .find_map(|l| {
                    l.strip_prefix("wasm_kubelet_tokio_alive_tasks ")?
                        .parse::<i64>()
                        .ok()
                })
                .unwrap_or_else(|| panic!("no task series: {text}"))
        };
        let _guard = runtime.enter();
        let before = alive(&r);
        let parked: Vec<_> = (0..3)
            .map(|_| runtime.spawn(std::future::pending::<()>()))
            .collect();
        assert_eq!(alive(&r), before + 3);
        for task in &parked {
            task.abort();
        }
        runtime.block_on(async {
            for task in parked {
                let _ = task.await;
            }
        });
        assert_eq!(alive(&r), before);
    }
}
