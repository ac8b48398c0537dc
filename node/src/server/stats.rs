//! `/stats/summary` (the kubelet's Summary API) and `/metrics/resource` (what metrics-server
//! scrapes), from real measurements: per-container CPU time and memory as the provider meters
//! them (thread CPU time of the polls that run the guest; live linear memories), node CPU from
//! /proc/stat, node memory from /proc/meminfo, filesystems by statvfs of --root-dir.
//!
//! Rates (`usageNanoCores`) need two samples: the [`Sampler`] task takes one every
//! `--housekeeping-interval` and is the only owner of the history; requests read its latest
//! [`Snapshot`] from a watch channel.

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, SystemTime};

use k8s_openapi::chrono::{DateTime, SecondsFormat, Utc};
use provider_api::{ContainerState, Provider};
use serde_json::{json, Value};
use tokio::sync::watch;
use tokio_util::sync::CancellationToken;

use prometheus_client::collector::Collector;
use prometheus_client::encoding::{DescriptorEncoder, EncodeLabelSet, EncodeMetric};
use prometheus_client::metrics::counter::ConstCounter;
use prometheus_client::metrics::gauge::{ConstGauge, Gauge};
use prometheus_client::metrics::MetricType;
use prometheus_client::registry::Registry;

use crate::{machine, metrics};

/// One container in a snapshot.
#[derive(Debug, Clone)]
pub struct ContainerSample {
    pub name: String,
    pub started: SystemTime,
    pub cpu_nanos: u64,
    /// Nanocores over the last interval; None until two samples exist.
    pub nano_cores: Option<u64>,
    pub memory_bytes: u64,
}

/// One pod in a snapshot.
#[derive(Debug, Clone)]
pub struct PodSample {
    pub namespace: String,
    pub name: String,
    pub uid: String,
    pub containers: Vec<ContainerSample>,
}

/// Everything measured at one instant.
#[derive(Debug, Clone)]
pub struct Snapshot {
    pub time: SystemTime,
    pub node_cpu_nanos: u64,
    pub node_nano_cores: Option<u64>,
    pub node_memory_total: u64,
    pub node_memory_available: u64,
    pub fs_capacity: u64,
    pub fs_available: u64,
    pub fs_inodes: u64,
    pub fs_inodes_free: u64,
    /// Bytes and files the provider's images (and compiled code) take; `None` without an image store.
    pub image_fs_used: Option<(u64, u64)>,
    pub pods: Vec<PodSample>,
}

/// Takes samples; the only owner of the previous one.
pub struct Sampler {
    provider: Arc<dyn Provider>,
    /// What the provider runs (the PLEG's snapshot; usage is as of its relist).
    runtime: crate::pods::pleg::RuntimeCache,
    root_dir: PathBuf,
    interval: Duration,
    tx: watch::Sender<Option<Arc<Snapshot>>>,
}

impl Sampler {
    pub fn new(
        provider: Arc<dyn Provider>,
        runtime: crate::pods::pleg::RuntimeCache,
        root_dir: PathBuf,
        interval: Duration,
    ) -> (Self, watch::Receiver<Option<Arc<Snapshot>>>) {
        let (tx, rx) = watch::channel(None);
        (
            Self {
                provider,
                runtime,
                root_dir,
                interval,
                tx,
            },
            rx,
        )
    }

    pub async fn run(self, shutdown: CancellationToken) {
        let mut previous: Option<Arc<Snapshot>> = None;
        let mut tick = tokio::time::interval(self.interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tick.tick() => {}
            }
            // While the runtime cannot be asked, the last snapshot stays the latest.
            let Some(snapshot) = self.sample(previous.as_deref()).await else {
                continue;
            };
            let snapshot = Arc::new(snapshot);
            self.tx.send_replace(Some(snapshot.clone()));
            previous = Some(snapshot);
        }
    }

    async fn sample(&self, previous: Option<&Snapshot>) -> Option<Snapshot> {
        let time = SystemTime::now();
        let elapsed = previous
            .and_then(|p| time.duration_since(p.time).ok())
            .filter(|d| !d.is_zero());
        let rate = |now: u64, before: Option<u64>| -> Option<u64> {
            let (before, elapsed) = (before?, elapsed?);
            Some((now.saturating_sub(before) as f64 / elapsed.as_secs_f64()) as u64)
        };
        let previous_cpu: HashMap<(&str, &str), u64> = previous
            .map(|p| {
                p.pods
                    .iter()
                    .flat_map(|pod| {
                        pod.containers
                            .iter()
                            .map(move |c| ((pod.uid.as_str(), c.name.as_str()), c.cpu_nanos))
                    })
                    .collect()
            })
            .unwrap_or_default();

        // Fresh, so usage and the sample's time agree (rates are per second between samples).
        let snapshot = self.runtime.fresh().await;
        let (Some(sandboxes), Some(_)) = (snapshot.sandboxes.clone(), snapshot.containers.as_ref())
        else {
            tracing::debug!("stats sample skipped: the container runtime cannot be listed");
            return None;
        };
        let mut pods = Vec::new();
        for sandbox in sandboxes {
            // The latest attempt of each container, running or not (its CPU time is cumulative
            // per attempt, as a container's is in the kubelet).
            let mut latest: HashMap<&str, &provider_api::ContainerSummary> = HashMap::new();
            for c in snapshot.of_pod(&sandbox.pod_uid).unwrap_or_default() {
                if latest
                    .get(c.name.as_str())
                    .is_none_or(|l| l.attempt < c.attempt)
                {
                    latest.insert(c.name.as_str(), c);
                }
            }
            let samples = latest
                .into_values()
                .filter_map(|c| {
                    let started = match c.state {
                        ContainerState::Running { started_at } => started_at,
                        _ => return None, // stats cover running containers, as the kubelet's do
                    };
                    let before = previous_cpu
                        .get(&(sandbox.pod_uid.as_str(), c.name.as_str()))
                        .copied();
                    Some(ContainerSample {
                        name: c.name.clone(),
                        started,
                        cpu_nanos: c.usage.cpu_nanos,
                        nano_cores: rate(
                            c.usage.cpu_nanos,
                            before.filter(|b| *b <= c.usage.cpu_nanos),
                        ),
                        memory_bytes: c.usage.memory_bytes,
                    })
                })
                .collect();
            pods.push(PodSample {
                namespace: sandbox.namespace,
                name: sandbox.name,
                uid: sandbox.pod_uid,
                containers: samples,
            });
        }

        let node_cpu_nanos = node_cpu_nanos();
        let capacity = machine::capacity(&self.root_dir).ok();
        let available = machine::available(&self.root_dir).ok();
        Some(Snapshot {
            time,
            node_cpu_nanos,
            node_nano_cores: rate(node_cpu_nanos, previous.map(|p| p.node_cpu_nanos)),
            node_memory_total: capacity.as_ref().map_or(0, |c| c.memory_bytes),
            node_memory_available: available.map_or(0, |a| a.memory_bytes),
            fs_capacity: capacity.as_ref().map_or(0, |c| c.ephemeral_storage_bytes),
            fs_available: available.map_or(0, |a| a.nodefs_bytes),
            fs_inodes: available.map_or(0, |a| a.nodefs_inodes_total),
            fs_inodes_free: available.map_or(0, |a| a.nodefs_inodes),
            image_fs_used: self
                .provider
                .image_fs()
                .await
                .map(|i| (i.used_bytes, i.inodes_used)),
            pods,
        })
    }
}

/// Busy CPU time of the whole machine from /proc/stat, in nanoseconds.
fn node_cpu_nanos() -> u64 {
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return 0;
    };
    let Some(line) = stat.lines().find(|l| l.starts_with("cpu ")) else {
        return 0;
    };
    let fields: Vec<u64> = line
        .split_whitespace()
        .skip(1)
        .filter_map(|f| f.parse().ok())
        .collect();
    // user nice system idle iowait irq softirq steal: busy = all but idle and iowait.
    let busy: u64 = fields
        .iter()
        .enumerate()
        .filter(|(i, _)| *i != 3 && *i != 4)
        .take(8)
        .map(|(_, v)| v)
        .sum();
    // SAFETY: sysconf has no preconditions.
    let ticks = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
    busy * (1_000_000_000 / ticks)
}

fn rfc3339(t: SystemTime) -> String {
    DateTime::<Utc>::from(t).to_rfc3339_opts(SecondsFormat::Secs, true)
}

/// The Summary API document (stats/v1alpha1) for `node_name`.
pub fn summary(node_name: &str, boot: SystemTime, s: &Snapshot) -> Value {
    let time = rfc3339(s.time);
    let cpu = |nanos: u64, cores: Option<u64>| {
        let mut v = json!({ "time": time, "usageCoreNanoSeconds": nanos });
        if let Some(c) = cores {
            v["usageNanoCores"] = json!(c);
        }
        v
    };
    let memory = |bytes: u64| json!({ "time": time, "usageBytes": bytes, "workingSetBytes": bytes, "rssBytes": bytes, "pageFaults": 0, "majorPageFaults": 0 });
    let fs = json!({
        "time": time,
        "availableBytes": s.fs_available,
        "capacityBytes": s.fs_capacity,
        "usedBytes": s.fs_capacity.saturating_sub(s.fs_available),
        "inodesFree": s.fs_inodes_free,
        "inodes": s.fs_inodes,
        "inodesUsed": s.fs_inodes.saturating_sub(s.fs_inodes_free),
    });
    let mut image_fs = fs.clone();
    if let Some((bytes, files)) = s.image_fs_used {
        image_fs["usedBytes"] = json!(bytes);
        image_fs["inodesUsed"] = json!(files);
    }
    let pods: Vec<Value> = s
        .pods
        .iter()
        .map(|p| {
            let containers: Vec<Value> = p
                .containers
                .iter()
                .map(|c| json!({ "name": c.name, "startTime": rfc3339(c.started), "cpu": cpu(c.cpu_nanos, c.nano_cores), "memory": memory(c.memory_bytes) }))
                .collect();
            let pod_cpu: u64 = p.containers.iter().map(|c| c.cpu_nanos).sum();
            let pod_cores = p.containers.iter().map(|c| c.nano_cores).sum::<Option<u64>>();
            let pod_memory: u64 = p.containers.iter().map(|c| c.memory_bytes).sum();
            let start = p.containers.iter().map(|c| c.started).min().unwrap_or(s.time);
            json!({
                "podRef": { "name": p.name, "namespace": p.namespace, "uid": p.uid },
                "startTime": rfc3339(start),
                "containers": containers,
                "cpu": cpu(pod_cpu, pod_cores),
                "memory": memory(pod_memory),
            })
        })
        .collect();
    let used_memory = s.node_memory_total.saturating_sub(s.node_memory_available);
    json!({
        "node": {
            "nodeName": node_name,
            "startTime": rfc3339(boot),
            "cpu": cpu(s.node_cpu_nanos, s.node_nano_cores),
            "memory": { "time": time, "availableBytes": s.node_memory_available, "usageBytes": used_memory, "workingSetBytes": used_memory, "rssBytes": used_memory, "pageFaults": 0, "majorPageFaults": 0 },
            "fs": fs,
            // Images and compiled modules live under --root-dir: the image filesystem is nodefs,
            // and its usedBytes are what the images take (as the kubelet reports the image store).
            "runtime": { "imageFs": image_fs },
        },
        "pods": pods,
    })
}

/// The Prometheus text metrics-server reads from `/metrics/resource`: the kubelet's families,
/// help texts and label order, each sample stamped with the snapshot's time (ms), as the
/// kubelet stamps them: metrics-server takes a CPU rate between two samples' own times.
pub fn resource_metrics(s: &Arc<Snapshot>) -> String {
    let ms = s
        .time
        .duration_since(SystemTime::UNIX_EPOCH)
        .map(|d| d.as_millis())
        .unwrap_or(0);
    let mut sampled = Registry::default();
    sampled.register_collector(Box::new(ResourceMetrics(s.clone())));
    // prometheus-client writes no timestamps: one is added to each sample line. In the text
    // format a line is a `#` comment or one sample (newlines in label values are escaped).
    let mut out = String::new();
    for line in metrics::encode(&sampled).lines() {
        out.push_str(line);
        if !line.starts_with('#') {
            out.push(' ');
            out.push_str(&ms.to_string());
        }
        out.push('\n');
    }
    // The kubelet's scrape_error has no timestamp.
    let mut unstamped = Registry::default();
    let scrape_error: Gauge = Gauge::default();
    metrics::describe(
        &mut unstamped,
        "scrape_error",
        "[ALPHA] 1 if there was an error while getting container metrics, 0 otherwise",
        &scrape_error,
    );
    out + &metrics::encode(&unstamped)
}

/// `container_*{container,pod,namespace}` (labels in the kubelet's order).
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct ContainerLabels {
    container: String,
    pod: String,
    namespace: String,
}

/// `pod_*{pod,namespace}`.
#[derive(Debug, Clone, PartialEq, Eq, Hash, EncodeLabelSet)]
struct PodLabels {
    pod: String,
    namespace: String,
}

/// `/metrics/resource`'s stamped families, read from one snapshot.
#[derive(Debug)]
struct ResourceMetrics(Arc<Snapshot>);

impl Collector for ResourceMetrics {
    fn encode(&self, mut encoder: DescriptorEncoder) -> Result<(), std::fmt::Error> {
        let s = &self.0;
        let secs = |nanos: u64| nanos as f64 / 1e9;
        let containers: Vec<(ContainerLabels, &ContainerSample)> = s
            .pods
            .iter()
            .flat_map(|p| {
                p.containers.iter().map(move |c| {
                    (
                        ContainerLabels {
                            container: c.name.clone(),
                            pod: p.name.clone(),
                            namespace: p.namespace.clone(),
                        },
                        c,
                    )
                })
            })
            .collect();
        let pods: Vec<(PodLabels, &PodSample)> = s
            .pods
            .iter()
            .map(|p| {
                (
                    PodLabels {
                        pod: p.name.clone(),
                        namespace: p.namespace.clone(),
                    },
                    p,
                )
            })
            .collect();
        // Counters are named without `_total`: the encoder adds it.
        family(
            &mut encoder,
            "container_cpu_usage_seconds",
            "[STABLE] Cumulative cpu time consumed by the container in core-seconds",
            MetricType::Counter,
            containers
                .iter()
                .map(|(l, c)| (l, ConstCounter::new(secs(c.cpu_nanos)))),
        )?;
        family(
            &mut encoder,
            "container_memory_working_set_bytes",
            "[STABLE] Current working set of the container in bytes",
            MetricType::Gauge,
            containers
                .iter()
                .map(|(l, c)| (l, ConstGauge::new(c.memory_bytes))),
        )?;
        family(
            &mut encoder,
            "container_start_time_seconds",
            "[STABLE] Start time of the container since unix epoch in seconds",
            MetricType::Gauge,
            containers.iter().map(|(l, c)| {
                (
                    l,
                    ConstGauge::new(
                        c.started
                            .duration_since(SystemTime::UNIX_EPOCH)
                            .map(|d| d.as_secs_f64())
                            .unwrap_or(0.0),
                    ),
                )
            }),
        )?;
        let node_cpu = encoder.encode_descriptor(
            "node_cpu_usage_seconds",
            "[STABLE] Cumulative cpu time consumed by the node in core-seconds",
            None,
            MetricType::Counter,
        )?;
        ConstCounter::new(secs(s.node_cpu_nanos)).encode(node_cpu)?;
        let node_memory = encoder.encode_descriptor(
            "node_memory_working_set_bytes",
            "[STABLE] Current working set of the node in bytes",
            None,
            MetricType::Gauge,
        )?;
        ConstGauge::new(s.node_memory_total.saturating_sub(s.node_memory_available))
            .encode(node_memory)?;
        family(
            &mut encoder,
            "pod_cpu_usage_seconds",
            "[STABLE] Cumulative cpu time consumed by the pod in core-seconds",
            MetricType::Counter,
            pods.iter().map(|(l, p)| {
                (
                    l,
                    ConstCounter::new(secs(p.containers.iter().map(|c| c.cpu_nanos).sum())),
                )
            }),
        )?;
        family(
            &mut encoder,
            "pod_memory_working_set_bytes",
            "[STABLE] Current working set of the pod in bytes",
            MetricType::Gauge,
            pods.iter().map(|(l, p)| {
                (
                    l,
                    ConstGauge::new(p.containers.iter().map(|c| c.memory_bytes).sum::<u64>()),
                )
            }),
        )
    }
}

/// One family: its `# HELP`/`# TYPE` lines (even without series, as the kubelet writes them) and
/// a sample per label set.
fn family<'a, L: EncodeLabelSet + 'a, M: EncodeMetric>(
    encoder: &mut DescriptorEncoder,
    name: &str,
    help: &str,
    kind: MetricType,
    series: impl Iterator<Item = (&'a L, M)>,
) -> Result<(), std::fmt::Error> {
    let mut family = encoder.encode_descriptor(name, help, None, kind)?;
    for (labels, metric) in series {
        metric.encode(family.encode_family(labels)?)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    fn snapshot() -> Snapshot {
        Snapshot {
            time: SystemTime::UNIX_EPOCH + Duration::from_secs(1_700_000_000),
            node_cpu_nanos: 5_000_000_000,
            node_nano_cores: Some(250_000_000),
            node_memory_total: 8 << 30,
            node_memory_available: 6 << 30,
            fs_capacity: 100,
            fs_available: 40,
            fs_inodes: 10,
            fs_inodes_free: 4,
            image_fs_used: Some((7, 2)),
            pods: vec![PodSample {
                namespace: "ns".into(),
                name: "p".into(),
                uid: "u".into(),
                containers: vec![ContainerSample {
                    name: "c".into(),
                    started: SystemTime::UNIX_EPOCH + Duration::from_secs(1_699_999_000),
                    cpu_nanos: 1_500_000_000,
                    nano_cores: Some(990_000_000),
                    memory_bytes: 65536,
                }],
            }],
        }
    }

    #[test]
    fn summary_has_the_kubelet_shape() {
        let v = summary("n1", SystemTime::UNIX_EPOCH, &snapshot());
        assert_eq!(v["node"]["nodeName"], "n1");
        assert_eq!(v["node"]["memory"]["workingSetBytes"], 2u64 << 30);
        assert_eq!(v["node"]["fs"]["usedBytes"], 60);
        assert_eq!(v["node"]["runtime"]["imageFs"]["usedBytes"], 7);
        assert_eq!(v["node"]["runtime"]["imageFs"]["capacityBytes"], 100);
        let pod = &v["pods"][0];
        assert_eq!(pod["podRef"]["uid"], "u");
        assert_eq!(
            pod["containers"][0]["cpu"]["usageNanoCores"],
            990_000_000u64
        );
        assert_eq!(pod["memory"]["workingSetBytes"], 65536);
    }

    #[test]
    fn resource_metrics_label_order_and_values() {
        let text = resource_metrics(&Arc::new(snapshot()));
        assert!(text.contains("container_cpu_usage_seconds_total{container=\"c\",pod=\"p\",namespace=\"ns\"} 1.5 1700000000000\n"), "{text}");
        assert!(text.contains("pod_memory_working_set_bytes{pod=\"p\",namespace=\"ns\"} 65536 "));
        assert!(text.contains("# TYPE node_cpu_usage_seconds_total counter"));
        assert!(text.contains("scrape_error 0"));
    }

    #[test]
    fn node_cpu_is_measured() {
        assert!(node_cpu_nanos() > 0);
    }
}
