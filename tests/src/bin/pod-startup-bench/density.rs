//! Scenario 4, density: idle pods added to one node in steps (100, 250, 500, 1000, ... up to
//! `--density N`, or until the first pod that does not run, named), with the node's memory
//! and CPU at each step and the cost of an idle pod as the slope between steps.
//!
//! Memory is per process: our agent, and its Wasm runtime process when the guests run apart
//! (`--wasm-runtime=spawn`, the default); each as VmRSS and as RssAnon (the anonymous part:
//! heap, stacks, guests' memories; without the binary's file pages, which grow as code runs
//! for the first time and are shared with the page cache).

use std::time::{Duration, Instant};

use futures::StreamExt;
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, ListParams, PostParams};
use kube::Api;

/// How many creates are in flight at once while a step adds its pods: enough to add 1,000
/// pods in well under a minute, few enough that the API server (on the same 2 cores) is not
/// the thing measured.
const CREATES_IN_FLIGHT: usize = 16;

/// The default steps; those above `--density N` are dropped and N itself is the last step.
const STEPS: &[usize] = &[100, 250, 500, 1000, 2000, 3000, 4000, 5000];

pub struct Args {
    pub max: usize,
    pub steps: Vec<usize>,
    pub settle: Duration,
    pub window: Duration,
}

impl Args {
    /// The steps for `max` pods: `steps` (or [`STEPS`]) below `max`, then `max`.
    pub fn new(max: usize, steps: Option<Vec<usize>>, settle: Duration, window: Duration) -> Args {
        let mut steps: Vec<usize> = steps
            .unwrap_or_else(|| STEPS.to_vec())
            .into_iter()
            .filter(|s| *s > 0 && *s < max)
            .collect();
        steps.sort_unstable();
        steps.dedup();
        steps.push(max);
        Args {
            max,
            steps,
            settle,
            window,
        }
    }
}

/// One labelled part of a node: its processes (summed). `apart`: shown, but not counted in
/// the node's totals (a runc node's pause and container processes: the pods' own, as a Wasm
/// node's guests are inside its runtime process).
pub struct Part {
    pub label: &'static str,
    pub pids: Vec<u32>,
    pub apart: bool,
}

impl Part {
    pub fn one(label: &'static str, pid: u32) -> Part {
        Part {
            label,
            pids: vec![pid],
            apart: false,
        }
    }
}

/// The density stops before the machine runs short: a step is not started while the
/// machine's MemAvailable is under this (the control plane, the other nodes and the test
/// runner share it; a peer's runc pods cost megabytes each).
const MIN_MEM_AVAILABLE_KIB: u64 = 2 * 1024 * 1024;

#[derive(Default, Clone)]
pub struct ProcUsage {
    pub label: &'static str,
    /// How many processes the part had when sampled.
    pub processes: usize,
    pub apart: bool,
    pub rss_kib: u64,
    pub anon_kib: u64,
    pub cpu_pct: f64,
    pub threads: u64,
}

#[derive(Default, Clone)]
pub struct Step {
    pub pods: usize,
    /// Seconds from the step's first create to its last pod seen Running.
    pub add_s: f64,
    pub procs: Vec<ProcUsage>,
}

impl Step {
    fn counted(&self) -> impl Iterator<Item = &ProcUsage> {
        self.procs.iter().filter(|p| !p.apart)
    }
    pub fn rss_kib(&self) -> u64 {
        self.counted().map(|p| p.rss_kib).sum()
    }
    pub fn anon_kib(&self) -> u64 {
        self.counted().map(|p| p.anon_kib).sum()
    }
    pub fn cpu_pct(&self) -> f64 {
        self.counted().map(|p| p.cpu_pct).sum()
    }
}

#[derive(Default)]
pub struct Result {
    pub max: usize,
    /// Step 0 (no pods) first.
    pub steps: Vec<Step>,
    /// The first pod that did not reach Running, with what its status said.
    pub failure: Option<String>,
}

/// KiB per pod between two steps (`None` when they hold the same number of pods).
fn slope(a: u64, b: u64, pods_a: usize, pods_b: usize) -> Option<f64> {
    (pods_b > pods_a).then(|| (b as f64 - a as f64) / (pods_b - pods_a) as f64)
}

impl Result {
    pub fn reached(&self) -> usize {
        self.steps.last().map_or(0, |s| s.pods)
    }

    /// Agent-side RSS per idle pod from step 0 to the last step.
    pub fn per_pod_kib(&self) -> Option<f64> {
        let (first, last) = (self.steps.first()?, self.steps.last()?);
        slope(first.rss_kib(), last.rss_kib(), first.pods, last.pods)
    }

    pub fn json(&self) -> serde_json::Value {
        let mut prev: Option<&Step> = None;
        let steps: Vec<serde_json::Value> = self
            .steps
            .iter()
            .map(|s| {
                let (rss_slope, anon_slope) = match prev {
                    Some(p) => (
                        slope(p.rss_kib(), s.rss_kib(), p.pods, s.pods),
                        slope(p.anon_kib(), s.anon_kib(), p.pods, s.pods),
                    ),
                    None => (None, None),
                };
                prev = Some(s);
                serde_json::json!({
                    "pods": s.pods,
                    "add_s": s.add_s,
                    "rss_kib": s.rss_kib(),
                    "anon_kib": s.anon_kib(),
                    "cpu_pct": s.cpu_pct(),
                    "rss_kib_per_pod_since_previous": rss_slope,
                    "anon_kib_per_pod_since_previous": anon_slope,
                    "processes": s.procs.iter().map(|p| serde_json::json!({
                        "process": p.label, "rss_kib": p.rss_kib, "anon_kib": p.anon_kib,
                        "cpu_pct": p.cpu_pct, "threads": p.threads, "count": p.processes,
                        "apart": p.apart,
                    })).collect::<Vec<_>>(),
                })
            })
            .collect();
        serde_json::json!({
            "max": self.max,
            "reached": self.reached(),
            "failure": self.failure,
            "rss_kib_per_pod": self.per_pod_kib(),
            "steps": steps,
        })
    }

    pub fn markdown(&self, kind: &str) -> String {
        let mut s = format!(
            "\n## 4. density: idle pods added in steps, {kind}\n\n\
             Up to {} pods; reached {}{}. Agent side = every process listed but those marked \
             apart (RSS; anon = RssAnon, without file pages); per pod = the slope since the \
             previous step.\n\n\
             | pods | added in | processes (RSS / anon, CPU) | RSS total | per pod (RSS) | per pod (anon) | CPU total |\n\
             |---|---|---|---|---|---|---|\n",
            self.max,
            self.reached(),
            match &self.failure {
                Some(f) => format!(", stopped by: {f}"),
                None => String::new(),
            }
        );
        let mut prev: Option<&Step> = None;
        for st in &self.steps {
            let per = |a: Option<f64>| a.map_or("-".to_string(), |v| format!("{v:.1} KiB"));
            let (rss, anon) = match prev {
                Some(p) => (
                    slope(p.rss_kib(), st.rss_kib(), p.pods, st.pods),
                    slope(p.anon_kib(), st.anon_kib(), p.pods, st.pods),
                ),
                None => (None, None),
            };
            s += &format!(
                "| {} | {:.1} s | {} | {:.1} MiB | {} | {} | {:.1} % |\n",
                st.pods,
                st.add_s,
                st.procs
                    .iter()
                    .map(|p| format!(
                        "{}{}{} {:.1} / {:.1} MiB, {:.1} %",
                        p.label,
                        if p.processes > 1 {
                            format!(" ({})", p.processes)
                        } else {
                            String::new()
                        },
                        if p.apart { " [apart]" } else { "" },
                        p.rss_kib as f64 / 1024.0,
                        p.anon_kib as f64 / 1024.0,
                        p.cpu_pct
                    ))
                    .collect::<Vec<_>>()
                    .join("; "),
                st.rss_kib() as f64 / 1024.0,
                per(rss),
                per(anon),
                st.cpu_pct(),
            );
            prev = Some(st);
        }
        if let Some(per) = self.per_pod_kib() {
            s += &format!(
                "\nFrom 0 to {} pods: {per:.1} KiB of agent-side RSS per idle pod.\n",
                self.reached()
            );
        }
        s
    }
}

fn status_kib(status: &str, field: &str) -> u64 {
    status
        .lines()
        .find(|l| l.starts_with(field))
        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        .unwrap_or(0)
}

/// RSS, RssAnon, threads and CPU over `window` of each part (summed over its processes).
pub async fn sample(parts: &[Part], window: Duration) -> Vec<ProcUsage> {
    let ticks = |part: &Part| -> u64 {
        part.pids
            .iter()
            .map(|p| super::compare::cpu_ticks(*p))
            .sum()
    };
    let t0: Vec<u64> = parts.iter().map(ticks).collect();
    tokio::time::sleep(window).await;
    parts
        .iter()
        .zip(t0)
        .map(|(part, t0)| {
            let mut usage = ProcUsage {
                label: part.label,
                processes: part.pids.len(),
                apart: part.apart,
                cpu_pct: ticks(part).saturating_sub(t0) as f64
                    / super::compare::clock_ticks()
                    / window.as_secs_f64()
                    * 100.0,
                ..ProcUsage::default()
            };
            for pid in &part.pids {
                let status =
                    std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
                usage.rss_kib += status_kib(&status, "VmRSS:");
                usage.anon_kib += status_kib(&status, "RssAnon:");
                usage.threads += status_kib(&status, "Threads:");
            }
            usage
        })
        .collect()
}

/// The machine's MemAvailable (KiB).
fn mem_available_kib() -> u64 {
    status_kib(
        &std::fs::read_to_string("/proc/meminfo").unwrap_or_default(),
        "MemAvailable:",
    )
}

/// What a pod's status says about why it is not Running (phase, reason, message, and its
/// container's waiting or terminated reason).
fn why(pod: &Pod) -> String {
    let Some(st) = &pod.status else {
        return "no status".into();
    };
    let mut parts = vec![format!("phase {}", st.phase.as_deref().unwrap_or("none"))];
    parts.extend(st.reason.iter().map(|r| format!("reason {r}")));
    parts.extend(st.message.iter().map(|m| format!("message {m:?}")));
    for c in st.container_statuses.iter().flatten() {
        if let Some(state) = &c.state {
            if let Some(w) = &state.waiting {
                parts.push(format!(
                    "container waiting: {} {}",
                    w.reason.as_deref().unwrap_or(""),
                    w.message.as_deref().unwrap_or("")
                ));
            }
            if let Some(t) = &state.terminated {
                parts.push(format!(
                    "container terminated: {} exit {}",
                    t.reason.as_deref().unwrap_or(""),
                    t.exit_code
                ));
            }
        }
    }
    parts.join(", ")
}

/// Runs the scenario: step 0 is measured as the node is now; each step adds pods (created
/// `CREATES_IN_FLIGHT` at a time) until the step's count, waits until all are Running, lets
/// the node settle, then samples. Stops at the first step with a pod that did not run. The
/// pods are deleted at the end (whatever happened).
pub async fn run(
    pods: &Api<Pod>,
    watch: &mut super::compare::Watch,
    make: &dyn Fn(&str) -> Pod,
    parts: &dyn Fn() -> Vec<Part>,
    args: &Args,
) -> Result {
    let mut result = Result {
        max: args.max,
        ..Result::default()
    };
    println!("density: step 0");
    result.steps.push(Step {
        pods: 0,
        add_s: 0.0,
        procs: sample(&parts(), args.window).await,
    });
    let mut names: Vec<String> = Vec::new();
    for &target in &args.steps {
        let available = mem_available_kib();
        if available < MIN_MEM_AVAILABLE_KIB {
            result.failure = Some(format!(
                "not started at step {target}: the machine's MemAvailable is {} MiB, under {} MiB",
                available / 1024,
                MIN_MEM_AVAILABLE_KIB / 1024
            ));
            break;
        }
        let new: Vec<String> = (names.len()..target).map(|i| format!("d-{i}")).collect();
        let t0 = Instant::now();
        let creates = futures::stream::iter(new.iter().map(|name| {
            let pod = make(name);
            let pods = pods.clone();
            async move {
                (
                    pod.metadata.name.clone(),
                    pods.create(&PostParams::default(), &pod).await,
                )
            }
        }))
        .buffer_unordered(CREATES_IN_FLIGHT)
        .collect::<Vec<_>>()
        .await;
        names.extend(new.iter().cloned());
        if let Some((name, Err(e))) = creates.into_iter().find(|(_, r)| r.is_err()) {
            result.failure = Some(format!(
                "create of pod {} refused: {e}",
                name.unwrap_or_default()
            ));
            break;
        }
        // Generous: the pods start in parallel, but the API server shares the machine.
        let timeout = Duration::from_secs(120) + Duration::from_millis(500) * new.len() as u32;
        let at = watch.until(&new, true, timeout).await;
        if let Some((name, _)) = new.iter().zip(&at).find(|(_, a)| a.is_none()) {
            let status = match pods.get_opt(name).await {
                Ok(Some(p)) => why(&p),
                Ok(None) => "gone".into(),
                Err(e) => format!("unreadable: {e}"),
            };
            let missing = at.iter().filter(|a| a.is_none()).count();
            result.failure = Some(format!(
                "pod {name} (one of {missing} not Running within {timeout:?} at step {target}): {status}"
            ));
            break;
        }
        let add_s = at
            .iter()
            .flatten()
            .max()
            .map_or(0.0, |last| (*last - t0).as_secs_f64());
        tokio::time::sleep(args.settle).await;
        let procs = sample(&parts(), args.window).await;
        let step = Step {
            pods: target,
            add_s,
            procs,
        };
        let prev = result.steps.last().expect("step 0");
        println!(
            "density: {} idle pods (+{} in {:.1} s): {} KiB RSS, {} KiB anon, {:.1} % CPU; {:.1} KiB RSS per pod since {} pods",
            target,
            new.len(),
            add_s,
            step.rss_kib(),
            step.anon_kib(),
            step.cpu_pct(),
            slope(prev.rss_kib(), step.rss_kib(), prev.pods, step.pods).unwrap_or(0.0),
            prev.pods
        );
        result.steps.push(step);
    }
    if let Some(f) = &result.failure {
        println!("density: stopped: {f}");
    }
    // Clean up: every density pod deleted at once (their grace period each), until gone.
    let _ = pods
        .delete_collection(&DeleteParams::default(), &ListParams::default())
        .await;
    let timeout = Duration::from_secs(120) + Duration::from_millis(100) * names.len() as u32;
    watch.until(&names, false, timeout).await;
    result
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn steps_end_at_max() {
        let a = Args::new(700, None, Duration::ZERO, Duration::ZERO);
        assert_eq!(a.steps, vec![100, 250, 500, 700]);
        let a = Args::new(5, Some(vec![2, 5, 9]), Duration::ZERO, Duration::ZERO);
        assert_eq!(a.steps, vec![2, 5]);
    }

    #[test]
    fn slope_between_steps() {
        let step = |pods, rss| Step {
            pods,
            add_s: 0.0,
            procs: vec![ProcUsage {
                label: "agent",
                rss_kib: rss,
                ..ProcUsage::default()
            }],
        };
        let r = Result {
            max: 200,
            steps: vec![step(0, 1000), step(100, 7400), step(200, 13800)],
            failure: None,
        };
        assert_eq!(r.per_pod_kib(), Some(64.0));
        assert_eq!(r.json()["steps"][2]["rss_kib_per_pod_since_previous"], 64.0);
        assert!(r.json()["steps"][0]["rss_kib_per_pod_since_previous"].is_null());
    }
}
