//! Pod churn against one agent, and what the agent's processes hold while it runs: the soak
//! (`deploy/soak`, tests/src/bin/soak.rs) and its CI version (tests/tests/soak_smoke.rs).
//!
//! One [`Churn::cycle`] creates a batch of pods of mixed kinds on the agent's node, takes each
//! to the state its kind is about (a job Succeeded, a crash loop restarted, an HTTP pod Ready
//! through its probes, an exec answered, `kubectl logs -f` lines read), deletes them all and
//! waits until every one is gone from the API server and from the agent's own pod list. A pod
//! that never gets there is an error naming it ("stuck"), never a silent skip.

use std::process::Stdio;
use std::time::Duration;

use anyhow::{bail, Context};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;
use tokio::io::AsyncBufReadExt;

use crate::{example_image, kubelet_get, phase, wait_for, Agent, Cluster, TestNamespace};

/// How long one pod may take to reach its kind's state, and to go once deleted. Generous:
/// the machine is shared and the agent a debug build; a pod slower than this is stuck.
const POD_TIMEOUT: Duration = Duration::from_secs(180);

/// What one process holds at one moment (from /proc).
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct ProcSample {
    pub rss_bytes: u64,
    pub fds: u64,
    pub threads: u64,
}

/// RSS, open fds and threads of `pid`; `None` once it is gone.
pub fn proc_sample(pid: u32) -> Option<ProcSample> {
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).ok()?;
    let field = |name: &str| {
        status.lines().find_map(|l| {
            l.strip_prefix(name)?
                .split_whitespace()
                .next()?
                .parse::<u64>()
                .ok()
        })
    };
    let rss_kib = field("VmRSS:")?;
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).ok()?.count() as u64;
    let threads = std::fs::read_dir(format!("/proc/{pid}/task")).ok()?.count() as u64;
    Some(ProcSample {
        rss_bytes: rss_kib * 1024,
        fds,
        threads,
    })
}

/// The agent's live tokio tasks (`wasm_kubelet_tokio_alive_tasks` on its `/metrics`).
pub fn alive_tasks(agent: &Agent) -> Option<u64> {
    let (status, body) = kubelet_get(agent, "/metrics");
    if status != 200 {
        return None;
    }
    body.lines().find_map(|l| {
        l.strip_prefix("wasm_kubelet_tokio_alive_tasks ")?
            .trim()
            .parse()
            .ok()
    })
}

/// One sample of the agent (and of its Wasm runtime process, where one runs).
#[derive(Debug, Clone, PartialEq)]
pub struct AgentSample {
    pub agent: ProcSample,
    pub runtime: Option<ProcSample>,
    pub runtime_pid: Option<u32>,
    pub tasks: Option<u64>,
}

/// Samples the agent now; `None` when its process is gone.
pub fn agent_sample(agent: &Agent) -> Option<AgentSample> {
    let sample = proc_sample(agent.pid()?)?;
    let runtime_pid = agent.runtime_pid();
    Some(AgentSample {
        agent: sample,
        runtime: runtime_pid.and_then(proc_sample),
        runtime_pid,
        tasks: alive_tasks(agent),
    })
}

/// The kinds of pod a cycle makes, one of each per round.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// `hello`, restartPolicy Never: Succeeded.
    Job,
    /// `crash-looper`, restartPolicy Always: restarted at least once.
    CrashLoop,
    /// `http-health` on its own port, readiness and liveness httpGet probes: Ready.
    Http,
    /// `toolbox sleep`: Running, then `kubectl exec -- echo` answers.
    Exec,
    /// `ticker`: Running, then `kubectl logs -f` yields two `tick` lines.
    LogsFollow,
}

pub const KINDS: [Kind; 5] = [
    Kind::Job,
    Kind::CrashLoop,
    Kind::Http,
    Kind::Exec,
    Kind::LogsFollow,
];

/// Totals over every cycle.
#[derive(Debug, Default, Clone, Copy)]
pub struct Counts {
    pub created: u64,
    pub deleted: u64,
    pub cycles: u64,
}

/// Pods created and deleted so far, readable while a cycle runs.
#[derive(Debug, Default)]
pub struct Progress {
    pub created: std::sync::atomic::AtomicU64,
    pub deleted: std::sync::atomic::AtomicU64,
}

/// Churn on one agent's node in one namespace.
pub struct Churn {
    pub ns: TestNamespace,
    pub node: String,
    pub counts: Counts,
    pub progress: std::sync::Arc<Progress>,
    next: u64,
}

impl Churn {
    pub fn new(ns: TestNamespace, node: &str) -> Churn {
        Churn {
            ns,
            node: node.to_string(),
            counts: Counts::default(),
            progress: Default::default(),
            next: 0,
        }
    }

    /// One cycle: `rounds` pods of every [`Kind`], all at once; each taken to its state, then
    /// all deleted and waited for until gone (also from the agent's `/pods`). Errors name the
    /// pods that did not get there.
    pub async fn cycle(&mut self, agent: &Agent, rounds: usize) -> anyhow::Result<()> {
        let mut pods = Vec::new();
        for _ in 0..rounds {
            for kind in KINDS {
                self.next += 1;
                pods.push((
                    format!("soak-{}-{}", kind_name(kind), self.next),
                    kind,
                    self.next,
                ));
            }
        }
        let api = self.ns.pods();
        for (name, kind, n) in &pods {
            api.create(&PostParams::default(), &pod(name, &self.node, *kind, *n))
                .await
                .with_context(|| format!("creating pod {name}"))?;
            self.counts.created += 1;
            self.progress
                .created
                .store(self.counts.created, std::sync::atomic::Ordering::Relaxed);
        }
        let results = futures::future::join_all(
            pods.iter()
                .map(|(name, kind, _)| drive(&api, &self.ns.name, name, *kind)),
        )
        .await;
        let failures: Vec<String> = results
            .into_iter()
            .zip(&pods)
            .filter_map(|(r, (name, _, _))| r.err().map(|e| format!("{name}: {e:#}")))
            .collect();
        // Delete even after a failure, so a stuck pod is the only thing left behind.
        for (name, _, _) in &pods {
            api.delete(name, &DeleteParams::default())
                .await
                .with_context(|| format!("deleting pod {name}"))?;
        }
        let gone = wait_for("every pod of the cycle gone", POD_TIMEOUT, || async {
            let left = api.list(&ListParams::default()).await.ok()?;
            left.items.is_empty().then_some(())
        })
        .await;
        if let Err(e) = gone {
            let left: Vec<String> = api
                .list(&ListParams::default())
                .await
                .map(|l| {
                    l.items
                        .iter()
                        .map(|p| {
                            format!(
                                "{} ({})",
                                p.metadata.name.clone().unwrap_or_default(),
                                phase(p)
                            )
                        })
                        .collect()
                })
                .unwrap_or_default();
            bail!("{e}: still there: {left:?}; earlier failures: {failures:?}");
        }
        self.counts.deleted += pods.len() as u64;
        self.progress
            .deleted
            .store(self.counts.deleted, std::sync::atomic::Ordering::Relaxed);
        // The agent forgets them too (its /pods lists what it still holds).
        let ns = self.ns.name.clone();
        wait_for(
            "the agent to forget the cycle's pods",
            POD_TIMEOUT,
            || async {
                let (status, body) = kubelet_get(agent, "/pods");
                let list: serde_json::Value = serde_json::from_str(&body).ok()?;
                let held = list["items"]
                    .as_array()?
                    .iter()
                    .any(|p| p["metadata"]["namespace"] == ns.as_str());
                (status == 200 && !held).then_some(())
            },
        )
        .await?;
        self.counts.cycles += 1;
        if !failures.is_empty() {
            bail!("pods that did not reach their state: {failures:#?}");
        }
        Ok(())
    }
}

fn kind_name(kind: Kind) -> &'static str {
    match kind {
        Kind::Job => "job",
        Kind::CrashLoop => "crash",
        Kind::Http => "http",
        Kind::Exec => "exec",
        Kind::LogsFollow => "logs",
    }
}

/// The HTTP pods' ports: one range of the node's own address, reused once the pods of a cycle
/// are gone (a cycle holds far fewer HTTP pods than this).
const HTTP_PORT_BASE: u64 = 21000;
const HTTP_PORTS: u64 = 500;

fn pod(name: &str, node: &str, kind: Kind, n: u64) -> Pod {
    let (image, restart, extra) = match kind {
        Kind::Job => (example_image("hello"), "Never", serde_json::json!({})),
        Kind::CrashLoop => (
            example_image("crash-looper"),
            "Always",
            serde_json::json!({}),
        ),
        Kind::Http => {
            let port = HTTP_PORT_BASE + n % HTTP_PORTS;
            (
                example_image("http-health"),
                "Always",
                serde_json::json!({
                    "ports": [{"name": "http", "containerPort": port}],
                    "env": [{"name": "STATE_DIR", "value": "/data"}],
                    "volumeMounts": [{"name": "data", "mountPath": "/data"}],
                    "readinessProbe": {"httpGet": {"path": "/ready", "port": "http"}, "periodSeconds": 2},
                    "livenessProbe": {"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 5},
                }),
            )
        }
        Kind::Exec => (
            example_image("toolbox"),
            "Always",
            serde_json::json!({"command": ["sleep", "3600"]}),
        ),
        Kind::LogsFollow => (example_image("ticker"), "Always", serde_json::json!({})),
    };
    let mut container =
        serde_json::json!({"name": "c", "image": image, "imagePullPolicy": "IfNotPresent"});
    if let (Some(c), serde_json::Value::Object(extra)) = (container.as_object_mut(), extra) {
        c.extend(extra);
    }
    let volumes = if kind == Kind::Http {
        serde_json::json!([{"name": "data", "emptyDir": {}}])
    } else {
        serde_json::json!([])
    };
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "labels": {"app": "soak"}},
        "spec": {
            "nodeName": node,
            "restartPolicy": restart,
            "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "volumes": volumes,
            "containers": [container],
        }
    }))
    .expect("a valid pod")
}

/// Takes one pod to its kind's state.
async fn drive(api: &Api<Pod>, ns: &str, name: &str, kind: Kind) -> anyhow::Result<()> {
    // A pod that failed instead (evicted under node pressure, say) is reported at once, with
    // its reason, rather than waited on.
    let reached = |check: fn(&Pod) -> bool, what: &'static str| async move {
        let pod = wait_for(what, POD_TIMEOUT, || async {
            api.get_opt(name)
                .await
                .ok()?
                .filter(|p| check(p) || phase(p) == "Failed")
        })
        .await?;
        if check(&pod) {
            return Ok(());
        }
        let status = pod.status.unwrap_or_default();
        bail!(
            "Failed instead of {what}: {} {}",
            status.reason.unwrap_or_default(),
            status.message.unwrap_or_default()
        )
    };
    match kind {
        Kind::Job => reached(|p| phase(p) == "Succeeded", "Succeeded").await,
        Kind::CrashLoop => reached(|p| restarts(p) >= 1, "a restart").await,
        Kind::Http => reached(ready, "Ready through its probes").await,
        Kind::Exec => {
            reached(running, "Running").await?;
            let out = kubectl(&["exec", "-n", ns, name, "--", "echo", "soak", name]).await?;
            if out.trim() != format!("soak {name}") {
                bail!("exec answered {out:?}");
            }
            Ok(())
        }
        Kind::LogsFollow => {
            reached(running, "Running").await?;
            follow_logs(ns, name, 2).await
        }
    }
}

fn restarts(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

fn running(pod: &Pod) -> bool {
    phase(pod) == "Running"
}

fn ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|c| c.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `kubectl ARGS` (admin); its stdout, or an error with its stderr.
pub async fn kubectl(args: &[&str]) -> anyhow::Result<String> {
    let mut cmd = tokio::process::Command::from(Cluster::get().kubectl());
    let out = tokio::time::timeout(POD_TIMEOUT, cmd.args(args).kill_on_drop(true).output())
        .await
        .with_context(|| format!("kubectl {args:?} did not end"))??;
    if !out.status.success() {
        bail!(
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// `kubectl logs -f` on the pod until `lines` lines saying `tick` came, then ends it.
async fn follow_logs(ns: &str, name: &str, lines: usize) -> anyhow::Result<()> {
    let mut cmd = tokio::process::Command::from(Cluster::get().kubectl());
    let mut child = cmd
        .args(["logs", "-f", "-n", ns, name])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .context("spawning kubectl logs -f")?;
    let stdout = child.stdout.take().context("kubectl's stdout")?;
    let mut reader = tokio::io::BufReader::new(stdout).lines();
    let read = async {
        let mut seen = 0;
        while let Some(line) = reader.next_line().await? {
            if line.contains("tick") {
                seen += 1;
                if seen >= lines {
                    return Ok::<_, anyhow::Error>(());
                }
            }
        }
        bail!("kubectl logs -f ended after {seen} tick lines")
    };
    let result = tokio::time::timeout(POD_TIMEOUT, read)
        .await
        .context("kubectl logs -f gave no lines")?;
    let _ = child.kill().await;
    result
}

/// Least-squares slope of `points` (x, y): y per unit of x. `None` with fewer than two
/// distinct x.
pub fn slope(points: &[(f64, f64)]) -> Option<f64> {
    let n = points.len() as f64;
    if points.len() < 2 {
        return None;
    }
    let mean_x = points.iter().map(|p| p.0).sum::<f64>() / n;
    let mean_y = points.iter().map(|p| p.1).sum::<f64>() / n;
    let sxx: f64 = points.iter().map(|p| (p.0 - mean_x).powi(2)).sum();
    if sxx == 0.0 {
        return None;
    }
    let sxy: f64 = points.iter().map(|p| (p.0 - mean_x) * (p.1 - mean_y)).sum();
    Some(sxy / sxx)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn slope_of_a_line_and_of_noise() {
        let line: Vec<(f64, f64)> = (0..10).map(|x| (x as f64, 3.0 * x as f64 + 7.0)).collect();
        assert!((slope(&line).unwrap() - 3.0).abs() < 1e-9);
        let flat = [(0.0, 5.0), (1.0, 6.0), (2.0, 5.0), (3.0, 6.0)];
        assert!(slope(&flat).unwrap().abs() < 0.5);
        assert_eq!(slope(&[(1.0, 2.0)]), None);
        assert_eq!(slope(&[(1.0, 2.0), (1.0, 3.0)]), None);
    }

    #[test]
    fn this_process_samples() {
        let s = proc_sample(std::process::id()).unwrap();
        assert!(s.rss_bytes > 0 && s.fds > 0 && s.threads >= 1, "{s:?}");
    }
}
