//! Benchmark: pod start-up, deletion and idle cost through the real API server of
//! deploy/local-cluster. Prints figures; it never fails on timing.
//!
//! Two modes:
//!
//!   pod-startup-bench [PODS] [AGENT FLAGS...]
//!     our node alone (as before): create -> Running for a cached Wasm image (`ticker`), and
//!     create -> Succeeded for `hello`; memory is the agent's and its runtime process's.
//!
//!   pod-startup-bench compare --pods N --out DIR [--burst N] [--peer NODE] [--runwasi-image REF]
//!                             [--density N [--density-steps A,B,..]] [--peer-density N]
//!                             [--settle S] [--window S]
//!     the same scenarios against our node and the peer node `deploy/peer-node` started (the
//!     real kubelet on containerd + runc; with --runwasi-image also runwasi's wasmtime shim on
//!     it, RuntimeClass `wasmtime`), in one run; writes DIR/compare.json and DIR/compare.md.
//!     --density N: scenario 4 on our node (density.rs): idle pods added in steps up to N.
//!     --peer-density N: the same on the peer kinds (their kubelet's maxPods bounds it; the
//!     runc pods' own processes are shown apart). A step is not started while the machine's
//!     MemAvailable is under 2 GiB.
//!     --settle / --window: seconds to let the node settle before a memory/CPU sample, and the
//!     CPU window of a sample (5 and 10 by default).
//!
//!   pod-startup-bench sleeper-wasm OUT     writes the comparison's Wasm guest to OUT
//!     `deploy/bench` runs it (it starts and stops the peer node).
//!
//!   cargo build --release -p wasm-kubelet -p integration-tests
//!   WASM_KUBELET_BIN=target/release/wasm-kubelet target/release/pod-startup-bench 100

use std::collections::HashMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use futures::StreamExt;
use integration_tests::{
    example_image, node_condition, percentile, push_examples, push_wat, unique_name, wait_for,
    Agent, Cluster,
};
use k8s_openapi::api::core::v1::{Namespace, Node, Pod, ServiceAccount};
use kube::api::{DeleteParams, PostParams};
use kube::runtime::watcher;
use kube::Api;

mod density;

fn pod(name: &str, node: &str, image: &str, restart: &str) -> Pod {
    serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": node, "restartPolicy": restart, "terminationGracePeriodSeconds": 0,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "c", "image": image, "imagePullPolicy": "IfNotPresent"}],
        }
    }))
    .expect("valid pod")
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

fn report(what: &str, mut samples: Vec<Duration>) {
    samples.sort();
    if samples.is_empty() {
        println!("{what}: no samples");
        return;
    }
    println!(
        "{what}: n={} p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms",
        samples.len(),
        ms(percentile(&samples, 0.5)),
        ms(percentile(&samples, 0.9)),
        ms(percentile(&samples, 0.99)),
        ms(*samples.last().unwrap())
    );
}

fn proc_status_kib(pid: u32, field: &str) -> u64 {
    std::fs::read_to_string(format!("/proc/{pid}/status"))
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with(field))
                .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
        })
        .unwrap_or(0)
}

fn rss_kib(pid: u32) -> u64 {
    proc_status_kib(pid, "VmRSS:")
}

/// Creates `names` one after another and returns, per pod, create -> first watch event where
/// `done` holds.
async fn measure(
    pods: &Api<Pod>,
    node: &str,
    image: &str,
    restart: &str,
    names: &[String],
    done: fn(&Pod) -> bool,
) -> Vec<Duration> {
    let (tx, mut rx) = tokio::sync::mpsc::unbounded_channel::<(String, Instant)>();
    let watch_api = pods.clone();
    let watch = tokio::spawn(async move {
        let mut stream = watcher::watcher(watch_api, watcher::Config::default()).boxed();
        while let Some(Ok(event)) = stream.next().await {
            if let watcher::Event::Apply(p) | watcher::Event::InitApply(p) = event {
                if done(&p) {
                    let _ = tx.send((p.metadata.name.unwrap_or_default(), Instant::now()));
                }
            }
        }
    });
    let mut created = HashMap::new();
    for name in names {
        created.insert(name.clone(), Instant::now());
        pods.create(&PostParams::default(), &pod(name, node, image, restart))
            .await
            .expect("create pod");
    }
    let mut seen = HashMap::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while seen.len() < names.len() && Instant::now() < deadline {
        if let Ok(Some((name, at))) = tokio::time::timeout(Duration::from_secs(5), rx.recv()).await
        {
            if let Some(t0) = created.get(&name) {
                seen.entry(name).or_insert(at - *t0);
            }
        }
    }
    watch.abort();
    if seen.len() < names.len() {
        println!(
            "warning: only {} of {} pods reached the state within 300 s",
            seen.len(),
            names.len()
        );
    }
    seen.into_values().collect()
}

fn running(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Running")
}

fn succeeded(p: &Pod) -> bool {
    p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
}

/// A namespace of the run, once its `default` ServiceAccount exists (pods need it for the
/// projected `kube-api-access` volume).
async fn bench_namespace(client: &kube::Client) -> anyhow::Result<String> {
    let ns_name = unique_name("bench");
    let ns: Namespace = serde_json::from_value(serde_json::json!({"metadata": {"name": ns_name}}))?;
    Api::<Namespace>::all(client.clone())
        .create(&PostParams::default(), &ns)
        .await?;
    let sas: Api<ServiceAccount> = Api::namespaced(client.clone(), &ns_name);
    wait_for(
        "the default service account",
        Duration::from_secs(60),
        || async { sas.get_opt("default").await.ok()? },
    )
    .await?;
    Ok(ns_name)
}

#[tokio::main]
async fn main() -> anyhow::Result<()> {
    match std::env::args().nth(1).as_deref() {
        Some("compare") => return compare::main(std::env::args().skip(2).collect()).await,
        // The comparison's Wasm guest as a file, for an ordinary OCI image (runwasi's shim
        // under containerd 1.6 runs the .wasm file an image's entrypoint names).
        Some("sleeper-wasm") => {
            let out = std::env::args()
                .nth(2)
                .ok_or_else(|| anyhow::anyhow!("usage: pod-startup-bench sleeper-wasm OUT"))?;
            std::fs::write(out, wat::parse_str(compare::SLEEPER_WAT)?)?;
            return Ok(());
        }
        _ => {}
    }
    let n: usize = std::env::args()
        .nth(1)
        .map(|s| s.parse())
        .transpose()?
        .unwrap_or(100);
    let cluster = Cluster::get();
    push_examples();
    let client = cluster.admin().await;
    let extra: Vec<String> = std::env::args().skip(2).collect();
    let mut flags = vec!["--max-pods=5000"];
    flags.extend(extra.iter().map(String::as_str));
    let agent = Agent::start(&unique_name("bench"), &flags)?;
    println!("agent flags: {}", extra.join(" "));
    let ns_name = bench_namespace(&client).await?;
    let pods: Api<Pod> = Api::namespaced(client.clone(), &ns_name);

    // Warm-up: pull and compile both images once, so the figures are for a cached image.
    let warm: Vec<String> = vec!["warm-ticker".into()];
    measure(
        &pods,
        &agent.name,
        &example_image("ticker"),
        "Always",
        &warm,
        running,
    )
    .await;
    measure(
        &pods,
        &agent.name,
        &example_image("hello"),
        "Never",
        &["warm-hello".into()],
        succeeded,
    )
    .await;

    // The pods' memory is wherever the guests run: the agent, and the runtime process if any.
    let rss = || rss_kib(agent.pid().unwrap_or(0)) + agent.runtime_pid().map_or(0, rss_kib);
    let rss_before = rss();
    let names: Vec<String> = (0..n).map(|i| format!("ticker-{i}")).collect();
    let started = Instant::now();
    let samples = measure(
        &pods,
        &agent.name,
        &example_image("ticker"),
        "Always",
        &names,
        running,
    )
    .await;
    let wall = started.elapsed();
    report("create -> Running (ticker, cached image)", samples);
    println!("{n} pods Running in {:.2}s wall", wall.as_secs_f64());
    let rss_after = rss();
    println!(
        "agent + runtime RSS: {} KiB before, {} KiB with {} more running pods ({:.0} KiB per pod)",
        rss_before,
        rss_after,
        n,
        (rss_after.saturating_sub(rss_before)) as f64 / n as f64
    );

    let hello: Vec<String> = (0..n.min(50)).map(|i| format!("hello-{i}")).collect();
    report(
        "create -> Succeeded (hello)",
        measure(
            &pods,
            &agent.name,
            &example_image("hello"),
            "Never",
            &hello,
            succeeded,
        )
        .await,
    );

    let _ = Api::<Namespace>::all(client)
        .delete(&ns_name, &DeleteParams::default())
        .await;
    Ok(())
}

/// The comparison run: every scenario against every node kind, in one process.
mod compare {
    use super::*;

    /// The Wasm guest of the comparison: waits forever (a one-hour `poll_oneoff` clock, again
    /// and again) and does nothing else, like the pause program the runc pods run
    /// (deploy/pause). The host stops it by interrupting it.
    pub const SLEEPER_WAT: &str = r#"(module
  (import "wasi_snapshot_preview1" "poll_oneoff"
    (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  ;; One clock subscription at 0 (48 bytes): tag 0 = clock at 8, clock id 1 (monotonic) at
  ;; 16, timeout 3600 s in ns at 24. The event lands at 64, the count at 96.
  (func (export "_start")
    (i32.store8 (i32.const 8) (i32.const 0))
    (i32.store (i32.const 16) (i32.const 1))
    (i64.store (i32.const 24) (i64.const 3600000000000))
    (loop $again
      (drop (call $poll (i32.const 0) (i32.const 64) (i32.const 1) (i32.const 96)))
      (br $again))))"#;

    /// The pods' terminationGracePeriodSeconds (see [`pod_spec`]).
    const GRACE_SECONDS: i64 = 1;

    /// One node kind under test.
    struct Kind<'a> {
        label: &'static str,
        node: String,
        image: String,
        runtime_class: Option<&'static str>,
        /// Processes that make up the node's agent side (for RSS/CPU), found anew each time.
        procs: Box<dyn Fn() -> Procs + 'a>,
        /// Scenario 4 (density) on this kind; `None`: the kind skips it.
        density: Option<Density<'a>>,
    }

    /// Up to how many pods, and the node's parts to sample at each step.
    struct Density<'a> {
        max: usize,
        parts: Box<dyn Fn() -> Vec<density::Part> + 'a>,
    }

    /// The peer's parts for the density scenario: the kubelet, its containerd and the shims
    /// (the node's side, counted), and the pods' own processes (pause and the container for
    /// runc; shown apart). `None` when `max` is 0.
    fn peer_density<'a>(
        max: usize,
        kubelet: u32,
        containerd: u32,
        socket: &str,
    ) -> Option<Density<'a>> {
        let socket = socket.to_string();
        (max > 0).then(|| Density {
            max,
            parts: Box::new(move || {
                let procs = peer_procs(kubelet, containerd, &socket);
                let shims = procs.agent.iter().copied().skip(2).collect();
                vec![
                    density::Part::one("kubelet", kubelet),
                    density::Part::one("containerd", containerd),
                    density::Part {
                        label: "shims",
                        pids: shims,
                        apart: false,
                    },
                    density::Part {
                        label: "pods' processes",
                        pids: procs.pods,
                        apart: true,
                    },
                ]
            }),
        })
    }

    /// The agent-side processes of a node and the pods' own processes (runc pods only: a Wasm
    /// node's guests live inside its runtime process).
    struct Procs {
        agent: Vec<u32>,
        pods: Vec<u32>,
    }

    struct Args {
        pods: usize,
        burst: usize,
        out: PathBuf,
        peer: Option<String>,
        /// An ordinary OCI image whose entrypoint is the sleeper's .wasm file (deploy/bench).
        runwasi_image: Option<String>,
        /// Scenario 4 up to this many pods on our node (0: not run).
        density: usize,
        /// The same on the peer node kinds (0: not run); their kubelet's max-pods bounds it.
        peer_density: usize,
        density_steps: Option<Vec<usize>>,
        settle: Duration,
        window: Duration,
    }

    fn parse(args: Vec<String>) -> anyhow::Result<Args> {
        let mut a = Args {
            pods: 100,
            burst: 0,
            out: PathBuf::from("docs/bench"),
            peer: std::env::var("PEER_NODE").ok(),
            runwasi_image: None,
            density: 0,
            peer_density: 0,
            density_steps: None,
            settle: Duration::from_secs(5),
            window: Duration::from_secs(10),
        };
        let mut it = args.into_iter();
        while let Some(flag) = it.next() {
            let mut value = || {
                it.next()
                    .ok_or_else(|| anyhow::anyhow!("{flag} needs a value"))
            };
            match flag.as_str() {
                "--pods" => a.pods = value()?.parse()?,
                "--burst" => a.burst = value()?.parse()?,
                "--out" => a.out = value()?.into(),
                "--peer" => a.peer = Some(value()?),
                "--runwasi-image" => a.runwasi_image = Some(value()?),
                "--density" => a.density = value()?.parse()?,
                "--peer-density" => a.peer_density = value()?.parse()?,
                "--density-steps" => {
                    a.density_steps = Some(
                        value()?
                            .split(',')
                            .map(str::parse)
                            .collect::<Result<_, _>>()?,
                    )
                }
                "--settle" => a.settle = Duration::from_secs_f64(value()?.parse()?),
                "--window" => a.window = Duration::from_secs_f64(value()?.parse()?),
                other => anyhow::bail!("unknown flag {other}"),
            }
        }
        anyhow::ensure!(a.pods > 0, "--pods must be at least 1");
        anyhow::ensure!(a.window > Duration::ZERO, "--window must be above 0");
        Ok(a)
    }

    fn pod_spec(name: &str, kind: &Kind<'_>) -> Pod {
        let mut p = pod(name, &kind.node, &kind.image, "Always");
        let spec = p.spec.as_mut().expect("spec");
        // Graceful deletion with a short grace period: the pause program ends at once on
        // SIGTERM, but a WASI preview1 guest has no signals, so our node waits the whole grace
        // period before it stops the guest (providers/wasmtime stop_container); at the
        // Kubernetes default of 30 s a run of 100 deletions would take 50 minutes.
        spec.termination_grace_period_seconds = Some(GRACE_SECONDS);
        spec.runtime_class_name = kind.runtime_class.map(str::to_string);
        p
    }

    /// Every watch event of the namespace, with the time it arrived, kept per pod: when it was
    /// first seen Running and when it was deleted.
    pub struct Watch {
        rx: tokio::sync::mpsc::UnboundedReceiver<(String, bool, Instant)>,
        running: HashMap<String, Instant>,
        gone: HashMap<String, Instant>,
        task: tokio::task::JoinHandle<()>,
    }

    impl Watch {
        async fn start(pods: Api<Pod>) -> Watch {
            let (tx, rx) = tokio::sync::mpsc::unbounded_channel();
            let (ready_tx, ready_rx) = tokio::sync::oneshot::channel::<()>();
            let task = tokio::spawn(async move {
                let mut ready = Some(ready_tx);
                let mut stream = watcher::watcher(pods, watcher::Config::default()).boxed();
                while let Some(event) = stream.next().await {
                    let now = Instant::now();
                    match event {
                        Ok(watcher::Event::Apply(p)) | Ok(watcher::Event::InitApply(p))
                            if running(&p) =>
                        {
                            let _ = tx.send((p.metadata.name.unwrap_or_default(), true, now));
                        }
                        Ok(watcher::Event::Delete(p)) => {
                            let _ = tx.send((p.metadata.name.unwrap_or_default(), false, now));
                        }
                        Ok(watcher::Event::InitDone) => {
                            if let Some(r) = ready.take() {
                                let _ = r.send(());
                            }
                        }
                        _ => {}
                    }
                }
            });
            let _ = tokio::time::timeout(Duration::from_secs(30), ready_rx).await;
            Watch {
                rx,
                running: HashMap::new(),
                gone: HashMap::new(),
                task,
            }
        }

        /// Waits until every pod of `names` reached the state (`running`, else gone); returns
        /// the instants in `names` order (`None`: not within `timeout`).
        pub async fn until(
            &mut self,
            names: &[String],
            running: bool,
            timeout: Duration,
        ) -> Vec<Option<Instant>> {
            let deadline = Instant::now() + timeout;
            loop {
                let map = if running { &self.running } else { &self.gone };
                if names.iter().all(|n| map.contains_key(n)) || Instant::now() >= deadline {
                    return names.iter().map(|n| map.get(n).copied()).collect();
                }
                let left = deadline.saturating_duration_since(Instant::now());
                match tokio::time::timeout(left, self.rx.recv()).await {
                    Ok(Some((name, is_running, at))) => {
                        let map = if is_running {
                            &mut self.running
                        } else {
                            &mut self.gone
                        };
                        map.entry(name).or_insert(at);
                    }
                    // The watch ended: nothing more will come.
                    Ok(None) => {
                        let map = if running { &self.running } else { &self.gone };
                        return names.iter().map(|n| map.get(n).copied()).collect();
                    }
                    Err(_) => {}
                }
            }
        }
    }

    impl Drop for Watch {
        fn drop(&mut self) {
            self.task.abort();
        }
    }

    #[derive(Default, Clone)]
    struct Dist {
        n: usize,
        missing: usize,
        p50_ms: f64,
        p90_ms: f64,
        p99_ms: f64,
        max_ms: f64,
    }

    impl Dist {
        fn json(&self) -> serde_json::Value {
            serde_json::json!({"n": self.n, "missing": self.missing, "p50_ms": self.p50_ms,
                "p90_ms": self.p90_ms, "p99_ms": self.p99_ms, "max_ms": self.max_ms})
        }
    }

    impl Usage {
        fn json(&self) -> serde_json::Value {
            serde_json::json!({"agent_rss_kib": self.agent_rss_kib,
                "agent_cpu_pct": self.agent_cpu_pct, "pods_rss_kib": self.pods_rss_kib,
                "processes": self.processes})
        }
    }

    impl KindResult {
        fn json(&self) -> serde_json::Value {
            serde_json::json!({"kind": self.kind, "node": self.node, "image": self.image,
                "create_to_running": self.create_to_running.json(),
                "delete_to_gone": self.delete_to_gone.json(),
                "idle_0": self.idle_0.json(), "idle_n": self.idle_n.json(),
                "burst": self.burst.as_ref().map(|b| serde_json::json!({"pods": b.pods,
                    "all_running_s": b.all_running_s, "pods_per_s": b.pods_per_s,
                    "missing": b.missing})),
                "density": self.density.as_ref().map(density::Result::json),
                "samples_create_ms": self.samples_create_ms})
        }
    }

    fn dist(samples: &[Option<Duration>]) -> Dist {
        let mut s: Vec<Duration> = samples.iter().flatten().copied().collect();
        s.sort();
        let missing = samples.len() - s.len();
        if s.is_empty() {
            return Dist {
                missing,
                ..Dist::default()
            };
        }
        Dist {
            n: s.len(),
            missing,
            p50_ms: ms(percentile(&s, 0.5)),
            p90_ms: ms(percentile(&s, 0.9)),
            p99_ms: ms(percentile(&s, 0.99)),
            max_ms: ms(*s.last().unwrap()),
        }
    }

    #[derive(Default)]
    struct Usage {
        /// Agent side: our agent + runtime process; the kubelet + containerd + shims.
        agent_rss_kib: u64,
        agent_cpu_pct: f64,
        /// The pods' own processes (runc: pause and the container; 0 for Wasm).
        pods_rss_kib: u64,
        processes: usize,
    }

    #[derive(Default)]
    struct KindResult {
        kind: String,
        node: String,
        image: String,
        create_to_running: Dist,
        delete_to_gone: Dist,
        idle_0: Usage,
        idle_n: Usage,
        burst: Option<Burst>,
        density: Option<density::Result>,
        samples_create_ms: Vec<f64>,
    }

    #[derive(Default)]
    struct Burst {
        pods: usize,
        all_running_s: f64,
        pods_per_s: f64,
        missing: usize,
    }

    pub fn clock_ticks() -> f64 {
        // SAFETY: sysconf has no preconditions.
        (unsafe { libc::sysconf(libc::_SC_CLK_TCK) }) as f64
    }

    pub fn cpu_ticks(pid: u32) -> u64 {
        let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
            return 0;
        };
        // Fields after the command (which may hold spaces) ends with ')'.
        let rest = stat.rsplit_once(')').map_or("", |(_, r)| r);
        let f: Vec<&str> = rest.split_whitespace().collect();
        // utime and stime are fields 14 and 15 of stat, i.e. 11 and 12 after the state.
        f.get(11).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
            + f.get(12).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0)
    }

    /// RSS now and CPU over `window` (percent of one core) of the node's processes.
    async fn usage(procs: &dyn Fn() -> Procs, window: Duration) -> Usage {
        let before = procs();
        let t0: u64 = before.agent.iter().map(|&p| cpu_ticks(p)).sum();
        tokio::time::sleep(window).await;
        let after = procs();
        let t1: u64 = after.agent.iter().map(|&p| cpu_ticks(p)).sum();
        Usage {
            agent_rss_kib: after.agent.iter().map(|&p| rss_kib(p)).sum(),
            agent_cpu_pct: t1.saturating_sub(t0) as f64 / clock_ticks() / window.as_secs_f64()
                * 100.0,
            pods_rss_kib: after.pods.iter().map(|&p| rss_kib(p)).sum(),
            processes: after.agent.len(),
        }
    }

    /// (pid, ppid, cmdline) of every process.
    fn processes() -> Vec<(u32, u32, String)> {
        let mut out = Vec::new();
        for entry in std::fs::read_dir("/proc").into_iter().flatten().flatten() {
            let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
                continue;
            };
            let cmd = std::fs::read(format!("/proc/{pid}/cmdline"))
                .map(|b| String::from_utf8_lossy(&b).replace('\0', " "))
                .unwrap_or_default();
            let ppid = std::fs::read_to_string(format!("/proc/{pid}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with("PPid:"))
                        .and_then(|l| l.split_whitespace().nth(1)?.parse().ok())
                })
                .unwrap_or(0);
            out.push((pid, ppid, cmd));
        }
        out
    }

    /// The peer's processes: the kubelet, its containerd, the shims that containerd started
    /// (they name its socket), and the shims' children (the pods' processes).
    fn peer_procs(kubelet: u32, containerd: u32, socket: &str) -> Procs {
        let all = processes();
        let shims: Vec<u32> = all
            .iter()
            .filter(|(_, _, cmd)| cmd.contains("containerd-shim") && cmd.contains(socket))
            .map(|(pid, _, _)| *pid)
            .collect();
        let pods = all
            .iter()
            .filter(|(_, ppid, _)| shims.contains(ppid))
            .map(|(pid, _, _)| *pid)
            .collect();
        let mut agent = vec![kubelet, containerd];
        agent.extend(shims);
        Procs { agent, pods }
    }

    fn env(name: &str) -> anyhow::Result<String> {
        std::env::var(name).map_err(|_| anyhow::anyhow!("{name} is not set (deploy/bench sets it)"))
    }

    async fn run_kind(
        client: &kube::Client,
        kind: &Kind<'_>,
        args: &Args,
    ) -> anyhow::Result<KindResult> {
        let (n, burst) = (args.pods, args.burst);
        let ns = bench_namespace(client).await?;
        let pods: Api<Pod> = Api::namespaced(client.clone(), &ns);
        let mut watch = Watch::start(pods.clone()).await;
        let mut result = KindResult {
            kind: kind.label.into(),
            node: kind.node.clone(),
            image: kind.image.clone(),
            ..KindResult::default()
        };
        println!(
            "== {} (node {}, image {})",
            kind.label, kind.node, kind.image
        );

        // Warm-up: the image pulled (and for Wasm compiled) once, so the figures are for a
        // cached image; then deleted, so scenario 5 starts at 0 pods.
        let warm = vec!["warm".to_string()];
        pods.create(&PostParams::default(), &pod_spec("warm", kind))
            .await?;
        if watch.until(&warm, true, Duration::from_secs(180)).await[0].is_none() {
            anyhow::bail!("{}: the warm-up pod did not run within 180 s", kind.label);
        }
        pods.delete("warm", &DeleteParams::default()).await?;
        watch.until(&warm, false, Duration::from_secs(120)).await;

        // Scenario 5 (0 pods).
        result.idle_0 = usage(&*kind.procs, args.window).await;

        // Scenario 1: N pods one after another, each create -> Running before the next.
        let mut samples = Vec::new();
        let names: Vec<String> = (0..n).map(|i| format!("p-{i}")).collect();
        for name in &names {
            let t0 = Instant::now();
            pods.create(&PostParams::default(), &pod_spec(name, kind))
                .await?;
            let at = watch
                .until(std::slice::from_ref(name), true, Duration::from_secs(120))
                .await[0];
            samples.push(at.map(|at| at - t0));
        }
        result.create_to_running = dist(&samples);
        result.samples_create_ms = samples.iter().flatten().map(|d| ms(*d)).collect();
        report_dist("create -> Running", &result.create_to_running);

        // Scenario 5 (N idle pods), after the start-up work has settled.
        tokio::time::sleep(args.settle).await;
        result.idle_n = usage(&*kind.procs, args.window).await;
        println!(
            "agent side: {} KiB, {:.1} % CPU at 0 pods; {} KiB, {:.1} % CPU at {n} idle pods (+{} KiB for the pods' own processes)",
            result.idle_0.agent_rss_kib,
            result.idle_0.agent_cpu_pct,
            result.idle_n.agent_rss_kib,
            result.idle_n.agent_cpu_pct,
            result.idle_n.pods_rss_kib
        );

        // Scenario 3: graceful delete -> gone, one after another.
        let mut samples = Vec::new();
        for name in &names {
            let t0 = Instant::now();
            pods.delete(name, &DeleteParams::default()).await?;
            let at = watch
                .until(std::slice::from_ref(name), false, Duration::from_secs(120))
                .await[0];
            samples.push(at.map(|at| at - t0));
        }
        result.delete_to_gone = dist(&samples);
        report_dist("delete -> gone", &result.delete_to_gone);

        // Scenario 4: density, on the kinds that run it, before the burst: its baseline is a node
        // whose heap a burst of N pods has not grown yet.
        if let Some(Density { max, parts }) = &kind.density {
            let d = density::Args::new(*max, args.density_steps.clone(), args.settle, args.window);
            let make = |name: &str| pod_spec(name, kind);
            result.density = Some(density::run(&pods, &mut watch, &make, &**parts, &d).await);
        }

        // Scenario 2: a burst of pods created at once; time until all Running.
        if burst > 0 {
            let names: Vec<String> = (0..burst).map(|i| format!("b-{i}")).collect();
            let t0 = Instant::now();
            let creates = names.iter().map(|name| {
                let pods = pods.clone();
                let pod = pod_spec(name, kind);
                async move { pods.create(&PostParams::default(), &pod).await }
            });
            for r in futures::future::join_all(creates).await {
                r?;
            }
            let at = watch.until(&names, true, Duration::from_secs(600)).await;
            let missing = at.iter().filter(|a| a.is_none()).count();
            let last = at.iter().flatten().max().copied().unwrap_or(t0);
            let secs = (last - t0).as_secs_f64();
            result.burst = Some(Burst {
                pods: burst,
                all_running_s: secs,
                pods_per_s: (burst - missing) as f64 / secs.max(1e-9),
                missing,
            });
            println!(
                "burst of {burst}: all Running in {secs:.2} s ({:.1} pods/s, {missing} missing)",
                (burst - missing) as f64 / secs.max(1e-9)
            );
            let deletes = names.iter().map(|name| {
                let pods = pods.clone();
                async move { pods.delete(name, &DeleteParams::default()).await }
            });
            futures::future::join_all(deletes).await;
            watch.until(&names, false, Duration::from_secs(600)).await;
        }

        drop(watch);
        let _ = Api::<Namespace>::all(client.clone())
            .delete(&ns, &DeleteParams::default())
            .await;
        Ok(result)
    }

    fn report_dist(what: &str, d: &Dist) {
        println!(
            "{what}: n={} p50={:.1}ms p90={:.1}ms p99={:.1}ms max={:.1}ms{}",
            d.n,
            d.p50_ms,
            d.p90_ms,
            d.p99_ms,
            d.max_ms,
            if d.missing > 0 {
                format!(" ({} missing)", d.missing)
            } else {
                String::new()
            }
        );
    }

    fn command_line(cmd: &str, args: &[&str]) -> String {
        std::process::Command::new(cmd)
            .args(args)
            .output()
            .map(|o| {
                String::from_utf8_lossy(&o.stdout)
                    .lines()
                    .next()
                    .unwrap_or("")
                    .trim()
                    .to_string()
            })
            .unwrap_or_default()
    }

    fn machine() -> serde_json::Value {
        let cpuinfo = std::fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
        let model = cpuinfo
            .lines()
            .find(|l| l.starts_with("model name"))
            .and_then(|l| l.split_once(':'))
            .map_or("", |(_, v)| v.trim())
            .to_string();
        let mem_kib = std::fs::read_to_string("/proc/meminfo")
            .ok()
            .and_then(|s| {
                s.lines()
                    .next()
                    .and_then(|l| l.split_whitespace().nth(1)?.parse::<u64>().ok())
            })
            .unwrap_or(0);
        serde_json::json!({
            "cpus": std::thread::available_parallelism().map_or(0, |n| n.get()),
            "cpu_model": model,
            "memory_gib": (mem_kib as f64 / 1048576.0 * 10.0).round() / 10.0,
            "kernel": command_line("uname", &["-r"]),
            "containerd": command_line("containerd", &["--version"]),
            "runc": command_line("runc", &["--version"]),
            "kubernetes": Cluster::get().var("K8S_VERSION"),
        })
    }

    fn loadavg() -> String {
        std::fs::read_to_string("/proc/loadavg")
            .unwrap_or_default()
            .split_whitespace()
            .take(3)
            .collect::<Vec<_>>()
            .join(" ")
    }

    pub async fn main(args: Vec<String>) -> anyhow::Result<()> {
        let args = parse(args)?;
        let cluster = Cluster::get();
        let client = cluster.admin().await;
        let load_start = loadavg();
        let sleeper = push_wat("bench-sleeper", SLEEPER_WAT);

        let agent = Agent::start(&unique_name("bench"), &["--max-pods=5000"])?;
        let nodes: Api<Node> = Api::all(client.clone());
        wait_for("our node Ready", Duration::from_secs(60), || async {
            let node = nodes.get_opt(&agent.name).await.ok()??;
            (node_condition(&node, "Ready").as_deref() == Some("True")).then_some(())
        })
        .await?;
        let agent_pid = agent.pid().unwrap_or(0);
        let ours = &agent;
        let mut kinds = vec![Kind {
            label: "wasm-kubelet (Wasm)",
            node: agent.name.clone(),
            image: sleeper.clone(),
            runtime_class: None,
            procs: Box::new(move || Procs {
                agent: std::iter::once(agent_pid)
                    .chain(ours.runtime_pid())
                    .collect(),
                pods: Vec::new(),
            }),
            density: (args.density > 0).then(|| Density {
                max: args.density,
                parts: Box::new(move || {
                    std::iter::once(density::Part::one("agent", agent_pid))
                        .chain(ours.runtime_pid().map(|p| density::Part::one("runtime", p)))
                        .collect()
                }),
            }),
        }];
        if let Some(peer) = &args.peer {
            let kubelet: u32 = env("PEER_KUBELET_PID")?.parse()?;
            let containerd: u32 = env("PEER_CONTAINERD_PID")?.parse()?;
            let socket = env("PEER_SOCKET")?;
            let s = socket.clone();
            kinds.push(Kind {
                label: "kubelet + containerd + runc",
                node: peer.clone(),
                image: env("PEER_PAUSE_IMAGE")?,
                runtime_class: None,
                procs: Box::new(move || peer_procs(kubelet, containerd, &s)),
                density: peer_density(args.peer_density, kubelet, containerd, &socket),
            });
            if let Some(image) = &args.runwasi_image {
                kinds.push(Kind {
                    label: "kubelet + containerd + runwasi (wasmtime)",
                    node: peer.clone(),
                    image: image.clone(),
                    runtime_class: Some("wasmtime"),
                    density: peer_density(args.peer_density, kubelet, containerd, &socket),
                    procs: Box::new(move || peer_procs(kubelet, containerd, &socket)),
                });
            }
        }

        let started = jiff::Timestamp::now();
        let mut results = Vec::new();
        for kind in &kinds {
            match run_kind(&client, kind, &args).await {
                Ok(r) => results.push(r),
                Err(e) => println!("{}: failed: {e:#}", kind.label),
            }
        }
        let load_end = loadavg();
        drop(kinds);
        drop(agent);

        let json = serde_json::json!({
            "date": started.to_string(),
            "termination_grace_period_seconds": GRACE_SECONDS,
            "pods": args.pods,
            "burst": args.burst,
            "density": args.density,
            "peer_density": args.peer_density,
            "settle_s": args.settle.as_secs_f64(),
            "window_s": args.window.as_secs_f64(),
            "machine": machine(),
            "loadavg_start": load_start,
            "loadavg_end": load_end,
            "results": results.iter().map(KindResult::json).collect::<Vec<_>>(),
        });
        std::fs::create_dir_all(&args.out)?;
        std::fs::write(
            args.out.join("compare.json"),
            serde_json::to_string_pretty(&json)? + "\n",
        )?;
        let md = markdown(&json, &results);
        std::fs::write(args.out.join("compare.md"), &md)?;
        if let Err(e) = plot_startup(&args.out.join("compare-startup.svg"), &results) {
            println!("the start-up plot was not written: {e:#}");
        }
        println!("\n{md}");
        println!("written: {}", display(&args.out));
        Ok(())
    }

    fn display(p: &Path) -> String {
        let p = p.display();
        format!("{p}/compare.json, {p}/compare.md, {p}/compare-startup.svg")
    }

    /// The create -> Running distributions, one cumulative curve per node kind: the share of
    /// pods Running (y) within a time (x, milliseconds, log scale), so a median or a tail reads
    /// straight off the plot.
    fn plot_startup(path: &Path, results: &[KindResult]) -> anyhow::Result<()> {
        use plotters::prelude::*;
        let curves: Vec<(&str, Vec<(f64, f64)>)> = results
            .iter()
            .filter(|r| !r.samples_create_ms.is_empty())
            .map(|r| {
                let mut ms = r.samples_create_ms.clone();
                ms.sort_by(f64::total_cmp);
                let n = ms.len() as f64;
                let points = ms
                    .iter()
                    .enumerate()
                    .map(|(i, &x)| (x.max(0.1), (i + 1) as f64 / n))
                    .collect();
                (r.kind.as_str(), points)
            })
            .collect();
        anyhow::ensure!(!curves.is_empty(), "no create -> Running samples");
        let all = curves.iter().flat_map(|(_, c)| c.iter().map(|p| p.0));
        let (lo, hi) = all.fold((f64::MAX, 0.0f64), |(lo, hi), x| (lo.min(x), hi.max(x)));
        let root = SVGBackend::new(path, (1000, 600)).into_drawing_area();
        root.fill(&WHITE)?;
        let mut chart = ChartBuilder::on(&root)
            .caption("pod create -> Running (image cached)", ("sans-serif", 22))
            .margin(15)
            .x_label_area_size(40)
            .y_label_area_size(50)
            .build_cartesian_2d((lo * 0.8..hi * 1.25).log_scale(), 0.0..1.0)?;
        chart
            .configure_mesh()
            .x_desc("milliseconds (log scale)")
            .y_desc("share of pods Running")
            .draw()?;
        let colors = [BLUE, RED, GREEN, MAGENTA, CYAN];
        for (i, (label, points)) in curves.into_iter().enumerate() {
            let color = colors[i % colors.len()];
            chart
                .draw_series(LineSeries::new(points, color.stroke_width(2)))?
                .label(label)
                .legend(move |(x, y)| PathElement::new(vec![(x, y), (x + 20, y)], color));
        }
        chart
            .configure_series_labels()
            .position(SeriesLabelPosition::LowerRight)
            .border_style(BLACK)
            .background_style(WHITE.mix(0.8))
            .draw()?;
        root.present()?;
        Ok(())
    }

    /// What the load at the start says of the figures: the 1-minute load above the CPU count
    /// means other work shared the machine. (The load at the end is mostly the bench's own: the
    /// peer's pods and their teardown.)
    fn load_note(start: &str, cpus: u64) -> &'static str {
        let one_minute = start
            .split_whitespace()
            .next()
            .and_then(|l| l.parse::<f64>().ok());
        match one_minute {
            Some(l) if l <= cpus as f64 => {
                "quiet at the start; the load at the end is the bench's own, mostly the peer's pods"
            }
            Some(_) => "other work shared the machine at the start: figures under load",
            None => "load unknown",
        }
    }

    fn markdown(json: &serde_json::Value, results: &[KindResult]) -> String {
        let m = &json["machine"];
        let mut s = format!(
            "# Bench: our node against the peers, one run\n\n\
             {} · {} CPUs ({}), {} GiB · kernel {} · Kubernetes {} · {} · runc {}\n\
             load average at start {}, at end {} ({})\n\n",
            json["date"].as_str().unwrap_or(""),
            m["cpus"],
            m["cpu_model"].as_str().unwrap_or(""),
            m["memory_gib"],
            m["kernel"].as_str().unwrap_or(""),
            m["kubernetes"].as_str().unwrap_or(""),
            m["containerd"].as_str().unwrap_or(""),
            m["runc"]
                .as_str()
                .unwrap_or("")
                .trim_start_matches("runc version "),
            json["loadavg_start"].as_str().unwrap_or(""),
            json["loadavg_end"].as_str().unwrap_or(""),
            load_note(
                json["loadavg_start"].as_str().unwrap_or(""),
                m["cpus"].as_u64().unwrap_or(1)
            ),
        );
        let base = results.first();
        let ratio = |v: f64, b: f64| {
            if b > 0.0 {
                format!("{:.1}x", v / b)
            } else {
                "-".into()
            }
        };
        s += &format!(
            "## 1. create -> Running, cached image, {} pods one after another\n\n\
             | node | p50 | p90 | p99 | max | p50 vs ours |\n|---|---|---|---|---|---|\n",
            json["pods"]
        );
        for r in results {
            let d = &r.create_to_running;
            s += &format!(
                "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {:.1} ms | {} |\n",
                r.kind,
                d.p50_ms,
                d.p90_ms,
                d.p99_ms,
                d.max_ms,
                base.map_or("-".into(), |b| ratio(d.p50_ms, b.create_to_running.p50_ms))
            );
        }
        s += &format!(
            "\n## 3. graceful delete -> gone (watch Deleted), one after another, grace period {GRACE_SECONDS} s\n\n\
              A WASI preview1 guest has no signals: our node waits out the grace period; runc's \
              pause ends on SIGTERM.\n\n\
              | node | p50 | p99 | max | p50 vs ours |\n|---|---|---|---|---|\n"
        );
        for r in results {
            let d = &r.delete_to_gone;
            s += &format!(
                "| {} | {:.1} ms | {:.1} ms | {:.1} ms | {} |\n",
                r.kind,
                d.p50_ms,
                d.p99_ms,
                d.max_ms,
                base.map_or("-".into(), |b| ratio(d.p50_ms, b.delete_to_gone.p50_ms))
            );
        }
        s += &format!(
            "\n## 5. the node's own processes at 0 and {} idle pods\n\n\
             Agent side: ours = agent + its runtime process (the guests live there); the peer = \
             kubelet + containerd + shims. Pods' processes: runc's pause + container per pod.\n\n\
             | node | RSS at 0 | CPU at 0 | RSS at N | CPU at N | per idle pod (agent side) | pods' own processes at N |\n\
             |---|---|---|---|---|---|---|\n",
            json["pods"]
        );
        let n = json["pods"].as_f64().unwrap_or(1.0);
        for r in results {
            s += &format!(
                "| {} | {:.1} MiB | {:.1} % | {:.1} MiB | {:.1} % | {:.0} KiB | {:.1} MiB |\n",
                r.kind,
                r.idle_0.agent_rss_kib as f64 / 1024.0,
                r.idle_0.agent_cpu_pct,
                r.idle_n.agent_rss_kib as f64 / 1024.0,
                r.idle_n.agent_cpu_pct,
                r.idle_n
                    .agent_rss_kib
                    .saturating_sub(r.idle_0.agent_rss_kib) as f64
                    / n,
                r.idle_n.pods_rss_kib as f64 / 1024.0,
            );
        }
        for r in results {
            if let Some(d) = &r.density {
                s += &d.markdown(&r.kind);
            }
        }
        if results.iter().any(|r| r.burst.is_some()) {
            s += &format!(
                "\n## 2. burst: {} pods created at once, until all Running\n\n\
                 | node | all Running | pods/s | vs ours |\n|---|---|---|---|\n",
                json["burst"]
            );
            let base = base
                .and_then(|b| b.burst.as_ref())
                .map_or(0.0, |b| b.pods_per_s);
            for r in results {
                if let Some(b) = &r.burst {
                    // Pods that never ran within the wait (600 s) are named, not hidden.
                    let all_running = if b.missing == 0 {
                        format!("{:.2} s", b.all_running_s)
                    } else {
                        format!(
                            "**not all**: {} of {} Running, the last at {:.2} s; {} never within the 600 s wait",
                            b.pods - b.missing,
                            b.pods,
                            b.all_running_s,
                            b.missing
                        )
                    };
                    s += &format!(
                        "| {} | {} | {:.1} | {} |\n",
                        r.kind,
                        all_running,
                        b.pods_per_s,
                        ratio(b.pods_per_s, base)
                    );
                }
            }
        }
        s
    }
}
