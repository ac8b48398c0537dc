//! The agent's own Prometheus metrics: a tiny registry (counters, gauges, histograms, each a
//! family with labels) rendered in the text exposition format 0.0.4, served by the kubelet API
//! on `/metrics` ([`global`]) and `/metrics/probes` ([`probes`]).
//!
//! # Recording (any module)
//!
//! ```
//! use wasm_kubelet::metrics;
//! // The kubelet's own series are defined once, in [`kubelet()`]:
//! metrics::kubelet().pod_worker_duration.with(&["sync"]).observe(0.012);
//! metrics::kubelet().running_pods.with(&[]).set(3.0);
//! // A series of your own: register it once (same name again = the same family), keep the handle.
//! let probes = metrics::probes().counter(
//!     "prober_probe_total",
//!     "Cumulative number of a liveness, readiness or startup probe for a container by result.",
//!     &["probe_type", "result", "container", "pod", "namespace", "pod_uid"],
//! );
//! probes.with(&["Liveness", "successful", "c", "p", "ns", "uid"]).inc();
//! ```
//!
//! Why one global registry (and a second for probes) rather than a handle passed around: the
//! things that record are everywhere (pod workers, the PLEG, the status manager, the image
//! puller, probes) and a metric has no owner in the channel sense: it is a set of atomics that
//! only ever grows or is overwritten. Recording costs a lock only to find a labelled child
//! (`with`); keep the child (`Arc`) where a hot path records the same labels repeatedly, then
//! each record is one or two atomic operations. Unit tests that need exact figures make their
//! own [`Registry::new`].
//!
//! A family's labels are fixed at registration; `with` given the wrong number of values
//! records into a detached child (a bug in the caller, logged once, never a panic). Registering
//! a name again with another kind or other labels returns a detached family the same way.
//! Children are never removed (label values here are bounded: operations, results, states;
//! per-pod series like `prober_probe_total` should call [`Family::remove`] when the pod goes).

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, LazyLock, Mutex};

/// Prometheus' default histogram buckets (seconds), which the kubelet uses for its operation
/// timings (`metrics.DefBuckets`).
pub const DEFAULT_BUCKETS: &[f64] = &[0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0];

/// The kubelet's pod start-up buckets (seconds): round numbers, roughly exponential, up to an
/// hour (`podStartupDurationBuckets` in the kubelet's metrics). Wasm pods start in well under a
/// second, so the first bucket (0.5 s) is where most land.
pub const POD_START_BUCKETS: &[f64] =
    &[0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0, 8.0, 10.0, 20.0, 30.0, 45.0, 60.0, 120.0, 180.0, 240.0, 300.0, 360.0, 480.0, 600.0, 900.0, 1200.0, 1800.0, 2700.0, 3600.0];

/// The registry served on `/metrics`.
pub fn global() -> &'static Registry {
    static GLOBAL: LazyLock<Registry> = LazyLock::new(Registry::new);
    &GLOBAL
}

/// The registry served on `/metrics/probes` (`prober_probe_total`, as the kubelet serves it
/// apart from `/metrics`).
pub fn probes() -> &'static Registry {
    static PROBES: LazyLock<Registry> = LazyLock::new(Registry::new);
    &PROBES
}

/// The kubelet's own series in [`global`], named as the kubelet names them where it has one.
pub struct KubeletMetrics {
    /// `kubelet_pod_start_duration_seconds`: the pod's creation (in the API, or first seen for a
    /// static pod) to the worker observing every container Running. Once per pod UID.
    pub pod_start_duration: Histogram,
    /// `kubelet_pod_worker_duration_seconds{operation}`: one pod sync, `create` (first sync of
    /// a pod), `update` or `sync` (later syncs), `kill` (teardown).
    pub pod_worker_duration: Histogram,
    /// `kubelet_pleg_relist_duration_seconds`: one relist of the provider's containers.
    pub pleg_relist_duration: Histogram,
    /// `kubelet_running_pods`: pods with at least one running container (set by the PLEG).
    pub running_pods: Gauge,
    /// `kubelet_running_containers{container_state}`: containers by state
    /// (`created`, `running`, `exited`), set by the PLEG.
    pub running_containers: Gauge,
    /// `kubelet_image_pull_duration_seconds{result}`: image pulls, `success` or `error`; the
    /// `_count` series is the number of pulls. (The kubelet labels this by image size.)
    pub image_pull_duration: Histogram,
    /// `rest_client_requests_total{code,method,host}`: requests to the API server by status
    /// code (`<error>` when no response came), as client-go counts them.
    pub rest_client_requests: Counter,
    /// `kubelet_node_name{node}`: always 1.
    pub node_name: Gauge,
    /// `kubelet_http_requests_total{method,path,server_type,long_running}`: requests to the
    /// kubelet API that passed authorization, by the path's first segment (`pods`, `exec`, ...).
    pub http_requests: Counter,
}

/// The kubelet's series, registered in [`global`] on first use.
pub fn kubelet() -> &'static KubeletMetrics {
    static KUBELET: LazyLock<KubeletMetrics> = LazyLock::new(|| {
        let r = global();
        KubeletMetrics {
            pod_start_duration: r.histogram(
                "kubelet_pod_start_duration_seconds",
                "Duration in seconds from the pod's creation (or, for a static pod, the kubelet seeing it) to every container running, as observed by the pod worker",
                &[],
                POD_START_BUCKETS,
            ),
            pod_worker_duration: r.histogram(
                "kubelet_pod_worker_duration_seconds",
                "Duration in seconds to sync a single pod. Broken down by operation type: create, update, sync or kill",
                &["operation"],
                DEFAULT_BUCKETS,
            ),
            pleg_relist_duration: r.histogram("kubelet_pleg_relist_duration_seconds", "Duration in seconds for relisting pods in PLEG.", &[], DEFAULT_BUCKETS),
            running_pods: r.gauge("kubelet_running_pods", "Number of pods that have a running pod sandbox and a running container", &[]),
            running_containers: r.gauge("kubelet_running_containers", "Number of containers currently running", &["container_state"]),
            image_pull_duration: r.histogram(
                "kubelet_image_pull_duration_seconds",
                "Duration in seconds to pull an image, by result (success or error)",
                &["result"],
                &[0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0],
            ),
            rest_client_requests: r.counter(
                "rest_client_requests_total",
                "Number of HTTP requests to the API server, partitioned by status code, method, and host.",
                &["code", "method", "host"],
            ),
            node_name: r.gauge("kubelet_node_name", "The node's name. The count is always 1.", &["node"]),
            http_requests: r.counter(
                "kubelet_http_requests_total",
                "Number of the http requests received since the server started",
                &["method", "path", "server_type", "long_running"],
            ),
        }
    });
    &KUBELET
}

/// Records one pod worker pass: `kubelet_pod_worker_duration_seconds{operation}`, and, the
/// first time `status` shows every container running, `kubelet_pod_start_duration_seconds`
/// from the pod's creationTimestamp (or `first_seen`, for a pod without one) to now.
pub fn observe_pod_sync(
    operation: &str,
    took: std::time::Duration,
    pod: &k8s_openapi::api::core::v1::Pod,
    status: Option<&k8s_openapi::api::core::v1::PodStatus>,
    first_seen: k8s_openapi::chrono::DateTime<k8s_openapi::chrono::Utc>,
    start_observed: &mut bool,
) {
    let metrics = kubelet();
    metrics.pod_worker_duration.with(&[operation]).observe_duration(took);
    if *start_observed {
        return;
    }
    let Some(status) = status else { return };
    let statuses = status.container_statuses.as_deref().unwrap_or_default();
    let all_running = status.phase.as_deref() == Some("Running") && !statuses.is_empty() && statuses.iter().all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()));
    if !all_running {
        return;
    }
    *start_observed = true;
    let created = pod.metadata.creation_timestamp.as_ref().map(|t| t.0).unwrap_or(first_seen);
    let seconds = (k8s_openapi::chrono::Utc::now() - created).num_milliseconds().max(0) as f64 / 1000.0;
    metrics.pod_start_duration.with(&[]).observe(seconds);
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
        CountedApiService { inner, host: self.host.clone() }
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
    type Future = std::pin::Pin<Box<dyn std::future::Future<Output = Result<S::Response, S::Error>> + Send>>;

    fn poll_ready(&mut self, cx: &mut std::task::Context<'_>) -> std::task::Poll<Result<(), S::Error>> {
        self.inner.poll_ready(cx)
    }

    fn call(&mut self, request: http::Request<B>) -> Self::Future {
        let method = request.method().as_str().to_string();
        let host = self.host.clone();
        let response = self.inner.call(request);
        Box::pin(async move {
            let response = response.await;
            let code = match &response {
                Ok(r) => r.status().as_u16().to_string(),
                Err(_) => "<error>".to_string(),
            };
            kubelet().rest_client_requests.with(&[&code, &method, &host]).inc();
            response
        })
    }
}

/// What kind of series a family holds.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Counter,
    Gauge,
    Histogram,
}

impl Kind {
    fn as_str(self) -> &'static str {
        match self {
            Kind::Counter => "counter",
            Kind::Gauge => "gauge",
            Kind::Histogram => "histogram",
        }
    }
}

/// One value of a family, for one set of label values.
pub trait Metric: Send + Sync + 'static {
    #[doc(hidden)]
    fn new_with(buckets: &[f64]) -> Self;
    #[doc(hidden)]
    fn render(&self, name: &str, labels: &str, out: &mut String);
}

/// A family of series sharing a name, help, kind and label names.
pub struct Family<M: Metric> {
    inner: Arc<FamilyInner<M>>,
}

impl<M: Metric> Clone for Family<M> {
    fn clone(&self) -> Self {
        Family { inner: self.inner.clone() }
    }
}

struct FamilyInner<M> {
    name: String,
    help: String,
    kind: Kind,
    label_names: Vec<String>,
    buckets: Vec<f64>,
    children: Mutex<BTreeMap<Vec<String>, Arc<M>>>,
}

pub type Counter = Family<CounterValue>;
pub type Gauge = Family<GaugeValue>;
pub type Histogram = Family<HistogramValue>;

impl<M: Metric> Family<M> {
    fn new(name: &str, help: &str, kind: Kind, label_names: &[&str], buckets: &[f64]) -> Self {
        Family {
            inner: Arc::new(FamilyInner {
                name: name.to_string(),
                help: help.to_string(),
                kind,
                label_names: label_names.iter().map(|s| s.to_string()).collect(),
                buckets: buckets.to_vec(),
                children: Mutex::new(BTreeMap::new()),
            }),
        }
    }

    /// The series for these label values (in the order of the family's label names), made on
    /// first use. The wrong number of values gets a detached series (not rendered) and a
    /// warning: a caller's bug must not take the agent down.
    pub fn with(&self, values: &[&str]) -> Arc<M> {
        if values.len() != self.inner.label_names.len() {
            tracing::warn!(metric = %self.inner.name, expected = ?self.inner.label_names, given = ?values, "metric recorded with the wrong labels; dropped");
            return Arc::new(M::new_with(&self.inner.buckets));
        }
        let key: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        let mut children = self.inner.children.lock().unwrap_or_else(|e| e.into_inner());
        children.entry(key).or_insert_with(|| Arc::new(M::new_with(&self.inner.buckets))).clone()
    }

    /// Forgets the series with these label values (a pod that went away).
    pub fn remove(&self, values: &[&str]) {
        let key: Vec<String> = values.iter().map(|s| s.to_string()).collect();
        self.inner.children.lock().unwrap_or_else(|e| e.into_inner()).remove(&key);
    }

    /// Keeps only the series whose label values `keep` accepts.
    pub fn retain(&self, mut keep: impl FnMut(&[String]) -> bool) {
        self.inner.children.lock().unwrap_or_else(|e| e.into_inner()).retain(|k, _| keep(k));
    }

    fn render(&self, out: &mut String) {
        let inner = &self.inner;
        let children: Vec<(Vec<String>, Arc<M>)> = inner.children.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|(k, v)| (k.clone(), v.clone())).collect();
        if children.is_empty() {
            return;
        }
        let _ = writeln!(out, "# HELP {} {}", inner.name, escape_help(&inner.help));
        let _ = writeln!(out, "# TYPE {} {}", inner.name, inner.kind.as_str());
        for (values, metric) in children {
            let labels = inner.label_names.iter().zip(&values).map(|(n, v)| format!("{n}=\"{}\"", escape_label(v))).collect::<Vec<_>>().join(",");
            metric.render(&inner.name, &labels, out);
        }
    }
}

/// A monotonically increasing count.
#[derive(Debug, Default)]
pub struct CounterValue(AtomicU64);

impl CounterValue {
    pub fn inc(&self) {
        self.0.fetch_add(1, Ordering::Relaxed);
    }
    pub fn inc_by(&self, n: u64) {
        self.0.fetch_add(n, Ordering::Relaxed);
    }
    pub fn get(&self) -> u64 {
        self.0.load(Ordering::Relaxed)
    }
}

impl Metric for CounterValue {
    fn new_with(_: &[f64]) -> Self {
        CounterValue::default()
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), self.get());
    }
}

/// A value that goes up and down (an f64 in an atomic's bits).
#[derive(Debug, Default)]
pub struct GaugeValue(AtomicU64);

impl GaugeValue {
    pub fn set(&self, v: f64) {
        self.0.store(v.to_bits(), Ordering::Relaxed);
    }
    pub fn add(&self, delta: f64) {
        add_f64(&self.0, delta);
    }
    pub fn get(&self) -> f64 {
        f64::from_bits(self.0.load(Ordering::Relaxed))
    }
}

impl Metric for GaugeValue {
    fn new_with(_: &[f64]) -> Self {
        GaugeValue::default()
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let _ = writeln!(out, "{name}{} {}", braces(labels), number(self.get()));
    }
}

/// Observations counted into fixed buckets, with their sum and count.
#[derive(Debug)]
pub struct HistogramValue {
    /// Upper bounds, ascending; `+Inf` is implicit.
    bounds: Vec<f64>,
    /// Observations per bucket (not cumulative); one more than `bounds`, for `+Inf`.
    counts: Vec<AtomicU64>,
    sum: AtomicU64,
}

impl HistogramValue {
    pub fn observe(&self, v: f64) {
        let i = self.bounds.iter().position(|b| v <= *b).unwrap_or(self.bounds.len());
        self.counts[i].fetch_add(1, Ordering::Relaxed);
        add_f64(&self.sum, v);
    }
    /// Observes a duration in seconds.
    pub fn observe_duration(&self, d: std::time::Duration) {
        self.observe(d.as_secs_f64());
    }
    pub fn count(&self) -> u64 {
        self.counts.iter().map(|c| c.load(Ordering::Relaxed)).sum()
    }
    pub fn sum(&self) -> f64 {
        f64::from_bits(self.sum.load(Ordering::Relaxed))
    }
}

impl Metric for HistogramValue {
    fn new_with(buckets: &[f64]) -> Self {
        let mut bounds: Vec<f64> = buckets.iter().copied().filter(|b| b.is_finite()).collect();
        bounds.sort_by(|a, b| a.total_cmp(b));
        bounds.dedup();
        let counts = (0..=bounds.len()).map(|_| AtomicU64::new(0)).collect();
        HistogramValue { bounds, counts, sum: AtomicU64::new(0f64.to_bits()) }
    }
    fn render(&self, name: &str, labels: &str, out: &mut String) {
        let sep = if labels.is_empty() { "" } else { "," };
        let mut cumulative = 0;
        for (i, bound) in self.bounds.iter().enumerate() {
            cumulative += self.counts[i].load(Ordering::Relaxed);
            let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"{}\"}} {cumulative}", number(*bound));
        }
        cumulative += self.counts[self.bounds.len()].load(Ordering::Relaxed);
        let _ = writeln!(out, "{name}_bucket{{{labels}{sep}le=\"+Inf\"}} {cumulative}");
        let _ = writeln!(out, "{name}_sum{} {}", braces(labels), number(self.sum()));
        let _ = writeln!(out, "{name}_count{} {cumulative}", braces(labels));
    }
}

fn add_f64(cell: &AtomicU64, delta: f64) {
    let _ = cell.fetch_update(Ordering::Relaxed, Ordering::Relaxed, |bits| Some((f64::from_bits(bits) + delta).to_bits()));
}

fn braces(labels: &str) -> String {
    if labels.is_empty() {
        String::new()
    } else {
        format!("{{{labels}}}")
    }
}

/// A sample value as Prometheus parses it (`+Inf`, `-Inf`, `NaN`; Rust's `{}` otherwise).
fn number(v: f64) -> String {
    if v.is_nan() {
        "NaN".into()
    } else if v.is_infinite() {
        if v > 0.0 { "+Inf".into() } else { "-Inf".into() }
    } else {
        format!("{v}")
    }
}

fn escape_label(v: &str) -> String {
    v.replace('\\', "\\\\").replace('"', "\\\"").replace('\n', "\\n")
}

fn escape_help(v: &str) -> String {
    v.replace('\\', "\\\\").replace('\n', "\\n")
}

/// A set of families, rendered together.
pub struct Registry {
    counters: Mutex<Vec<Counter>>,
    gauges: Mutex<Vec<Gauge>>,
    histograms: Mutex<Vec<Histogram>>,
}

impl Default for Registry {
    fn default() -> Self {
        Self::new()
    }
}

impl Registry {
    pub fn new() -> Self {
        Registry { counters: Mutex::new(Vec::new()), gauges: Mutex::new(Vec::new()), histograms: Mutex::new(Vec::new()) }
    }

    /// Registers (or finds) a counter family.
    pub fn counter(&self, name: &str, help: &str, labels: &[&str]) -> Counter {
        self.register(&self.counters, name, help, Kind::Counter, labels, &[])
    }

    /// Registers (or finds) a gauge family.
    pub fn gauge(&self, name: &str, help: &str, labels: &[&str]) -> Gauge {
        self.register(&self.gauges, name, help, Kind::Gauge, labels, &[])
    }

    /// Registers (or finds) a histogram family with these bucket upper bounds.
    pub fn histogram(&self, name: &str, help: &str, labels: &[&str], buckets: &[f64]) -> Histogram {
        self.register(&self.histograms, name, help, Kind::Histogram, labels, buckets)
    }

    fn register<M: Metric>(&self, list: &Mutex<Vec<Family<M>>>, name: &str, help: &str, kind: Kind, labels: &[&str], buckets: &[f64]) -> Family<M> {
        if self.kind_of(name).is_some_and(|k| k != kind) {
            tracing::warn!(metric = name, "metric registered twice with different kinds; the second is not served");
            return Family::new(name, help, kind, labels, buckets);
        }
        let mut list = list.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(existing) = list.iter().find(|f| f.inner.name == name) {
            if existing.inner.label_names.iter().map(String::as_str).eq(labels.iter().copied()) {
                return existing.clone();
            }
            tracing::warn!(metric = name, "metric registered twice with different labels; the second is not served");
            return Family::new(name, help, kind, labels, buckets);
        }
        let family = Family::new(name, help, kind, labels, buckets);
        list.push(family.clone());
        family
    }

    fn kind_of(&self, name: &str) -> Option<Kind> {
        let has = |names: Vec<String>| names.iter().any(|n| n == name);
        if has(self.counters.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.inner.name.clone()).collect()) {
            Some(Kind::Counter)
        } else if has(self.gauges.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.inner.name.clone()).collect()) {
            Some(Kind::Gauge)
        } else if has(self.histograms.lock().unwrap_or_else(|e| e.into_inner()).iter().map(|f| f.inner.name.clone()).collect()) {
            Some(Kind::Histogram)
        } else {
            None
        }
    }

    /// Every family with at least one series, sorted by name, in the text format 0.0.4.
    pub fn render(&self) -> String {
        let mut families: Vec<(String, String)> = Vec::new();
        let mut add = |name: &str, text: String| families.push((name.to_string(), text));
        for f in self.counters.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let mut s = String::new();
            f.render(&mut s);
            add(&f.inner.name, s);
        }
        for f in self.gauges.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let mut s = String::new();
            f.render(&mut s);
            add(&f.inner.name, s);
        }
        for f in self.histograms.lock().unwrap_or_else(|e| e.into_inner()).clone() {
            let mut s = String::new();
            f.render(&mut s);
            add(&f.inner.name, s);
        }
        families.sort_by(|a, b| a.0.cmp(&b.0));
        families.into_iter().map(|(_, text)| text).collect()
    }
}

/// The `Content-Type` of [`Registry::render`]'s output.
pub const CONTENT_TYPE: &str = "text/plain; version=0.0.4; charset=utf-8";

/// `process_*` series of this process from `/proc/self`, read at scrape time (cheap: two small
/// files and a directory listing): resident memory, CPU seconds, start time, open fds.
pub fn process_metrics() -> String {
    let mut out = String::new();
    // Linux reports times in clock ticks and pages; both sizes come from sysconf.
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) } as f64;
    let page = unsafe { libc::sysconf(libc::_SC_PAGESIZE) } as f64;
    let Ok(stat) = std::fs::read_to_string("/proc/self/stat") else { return out };
    // Fields after the command (which may hold spaces) start at the last ')'.
    let Some(rest) = stat.rfind(')').map(|i| &stat[i + 1..]) else { return out };
    let fields: Vec<&str> = rest.split_whitespace().collect();
    // rest[0] is field 3 (state): utime is field 14, stime 15, starttime 22, rss 24.
    let field = |n: usize| fields.get(n - 3).and_then(|s| s.parse::<f64>().ok());
    if ticks > 0.0 {
        if let (Some(utime), Some(stime)) = (field(14), field(15)) {
            let _ = write!(out, "# HELP process_cpu_seconds_total Total user and system CPU time spent in seconds.\n# TYPE process_cpu_seconds_total counter\nprocess_cpu_seconds_total {}\n", number((utime + stime) / ticks));
        }
        let boot = std::fs::read_to_string("/proc/stat").ok().and_then(|s| s.lines().find_map(|l| l.strip_prefix("btime ")?.trim().parse::<f64>().ok()));
        if let (Some(start), Some(boot)) = (field(22), boot) {
            let _ = write!(out, "# HELP process_start_time_seconds Start time of the process since unix epoch in seconds.\n# TYPE process_start_time_seconds gauge\nprocess_start_time_seconds {}\n", number(boot + start / ticks));
        }
    }
    if let Some(rss) = field(24) {
        let _ = write!(out, "# HELP process_resident_memory_bytes Resident memory size in bytes.\n# TYPE process_resident_memory_bytes gauge\nprocess_resident_memory_bytes {}\n", number(rss * page));
    }
    if let Ok(fds) = std::fs::read_dir("/proc/self/fd") {
        let _ = write!(out, "# HELP process_open_fds Number of open file descriptors.\n# TYPE process_open_fds gauge\nprocess_open_fds {}\n", fds.count());
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn counters_and_gauges_render_with_labels() {
        let r = Registry::new();
        let c = r.counter("things_total", "Things.", &["kind", "result"]);
        c.with(&["a", "ok"]).inc();
        c.with(&["a", "ok"]).inc_by(2);
        c.with(&["b", "quote\"back\\slash"]).inc();
        let g = r.gauge("level", "A level\nwith a newline.", &[]);
        g.with(&[]).set(2.5);
        g.with(&[]).add(-1.0);
        let text = r.render();
        assert_eq!(
            text,
            "# HELP level A level\\nwith a newline.\n# TYPE level gauge\nlevel 1.5\n\
             # HELP things_total Things.\n# TYPE things_total counter\nthings_total{kind=\"a\",result=\"ok\"} 3\nthings_total{kind=\"b\",result=\"quote\\\"back\\\\slash\"} 1\n"
        );
    }

    #[test]
    fn histograms_are_cumulative_with_sum_and_count() {
        let r = Registry::new();
        let h = r.histogram("op_seconds", "Op.", &["op"], &[1.0, 0.1]);
        let child = h.with(&["x"]);
        child.observe(0.05);
        child.observe(0.1);
        child.observe(0.5);
        child.observe(7.0);
        assert_eq!(child.count(), 4);
        let text = r.render();
        assert!(text.contains("op_seconds_bucket{op=\"x\",le=\"0.1\"} 2\n"), "{text}");
        assert!(text.contains("op_seconds_bucket{op=\"x\",le=\"1\"} 3\n"), "{text}");
        assert!(text.contains("op_seconds_bucket{op=\"x\",le=\"+Inf\"} 4\n"), "{text}");
        assert!(text.contains("op_seconds_sum{op=\"x\"} 7.65\n"), "{text}");
        assert!(text.contains("op_seconds_count{op=\"x\"} 4\n"), "{text}");
    }

    #[test]
    fn families_without_series_are_not_rendered_and_registration_is_idempotent() {
        let r = Registry::new();
        let a = r.counter("a_total", "A.", &["x"]);
        assert_eq!(r.render(), "");
        let again = r.counter("a_total", "A.", &["x"]);
        again.with(&["1"]).inc();
        assert_eq!(a.with(&["1"]).get(), 1);
        // Same name, another kind: detached, never served, never a panic.
        let clash = r.gauge("a_total", "A.", &[]);
        clash.with(&[]).set(5.0);
        assert!(!r.render().contains("gauge"));
    }

    #[test]
    fn wrong_label_count_is_dropped_not_a_panic() {
        let r = Registry::new();
        let c = r.counter("b_total", "B.", &["x", "y"]);
        c.with(&["only-one"]).inc();
        assert_eq!(r.render(), "");
    }

    #[test]
    fn removed_series_disappear() {
        let r = Registry::new();
        let c = r.counter("c_total", "C.", &["pod"]);
        c.with(&["p1"]).inc();
        c.with(&["p2"]).inc();
        c.remove(&["p1"]);
        let text = r.render();
        assert!(!text.contains("p1") && text.contains("p2"), "{text}");
    }

    #[test]
    fn process_metrics_read_this_process() {
        let text = process_metrics();
        assert!(text.contains("process_resident_memory_bytes "), "{text}");
        let rss: f64 = text.lines().find_map(|l| l.strip_prefix("process_resident_memory_bytes ")).and_then(|v| v.parse().ok()).unwrap_or(0.0);
        assert!(rss > 0.0, "{text}");
        assert!(text.contains("process_cpu_seconds_total "), "{text}");
    }
}
