//! Control-plane and registry outages (issue #15): what a node must live through without
//! disturbing its pods.
//!
//! - the API server stopped for [`OUTAGE`] and started again;
//! - etcd stopped for [`OUTAGE`] under a running API server and started again;
//! - the registry stopped while a pod pulls, and started again.
//!
//! These stop control-plane processes, so they run against a PRIVATE cluster of their own
//! ([`PrivateCluster`]: `deploy/local-cluster up` in a directory of this test process, on free
//! ports in 24000-31999 (below the ephemeral range), without the TLS registry, containerd, metrics-server and the Linux
//! images), never the shared one the other test files use. It is brought down when the test
//! ends, failed or not. The cases share it and run one after another in one test.
//!
//! What the API server receives from the node is counted from the private API server's audit
//! log (a policy that records the requests of group `system:nodes`, one entry per request).

use std::collections::{BTreeMap, HashMap};
use std::path::PathBuf;
use std::process::Command;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use integration_tests::{
    node_condition, push_wat_to, test_node_on, unique_name, wait_for, workspace_root, Agent,
    Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::coordination::v1::Lease;
use k8s_openapi::api::core::v1::{Event, Node, Pod};
use k8s_openapi::chrono::{DateTime, Utc};
use kube::Api;

/// How long the API server (or etcd) stays away: the issue's two minutes, longer than the
/// controller manager's node-monitor grace period (20 s in the local cluster) and the node
/// lease (40 s), so the node's heartbeats lapse in the cluster's eyes.
const OUTAGE: Duration = Duration::from_secs(120);

/// The window after the API server returns in which the node's requests are counted.
const COUNT_WINDOW: Duration = Duration::from_secs(60);

/// Pods that run through every outage (a resync storm is one request per pod or more).
const TICKERS: usize = 6;

/// A guest that prints `tick NNNNNNNNNN` (a counter from 0, ten digits) every second, forever.
/// Its log shows whether it ran without a break and whether a second instance ever ran.
const TICKER: &str = r#"(module
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (memory (export "memory") 1)
  (data (i32.const 100) "tick 0000000000\n")
  (func (export "_start")
    (local $n i32) (local $v i32) (local $p i32)
    ;; one clock subscription at 256: tag 0 (clock) @264, id 1 (monotonic) @272, timeout 1 s @280
    (i64.store (i32.const 280) (i64.const 1000000000))
    (i32.store (i32.const 272) (i32.const 1))
    ;; one iovec at 0: the 16-byte line at 100
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 16))
    (loop $again
      (local.set $v (local.get $n))
      (local.set $p (i32.const 114))
      (loop $digit
        (i32.store8 (local.get $p) (i32.add (i32.const 48) (i32.rem_u (local.get $v) (i32.const 10))))
        (local.set $v (i32.div_u (local.get $v) (i32.const 10)))
        (local.set $p (i32.sub (local.get $p) (i32.const 1)))
        (br_if $digit (i32.ge_u (local.get $p) (i32.const 105))))
      (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
      (drop (call $poll (i32.const 256) (i32.const 768) (i32.const 1) (i32.const 1000)))
      (local.set $n (i32.add (local.get $n) (i32.const 1)))
      (br $again))))"#;

/// A guest that waits (100 ms sleeps) until a file `go` appears in its first volume (fd 3),
/// prints `exiting` and exits 0: the test ends it while the API server is away.
const WAITER: &str = r#"(module
  (import "wasi_snapshot_preview1" "path_filestat_get" (func $stat (param i32 i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "poll_oneoff" (func $poll (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "fd_write" (func $write (param i32 i32 i32 i32) (result i32)))
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (data (i32.const 64) "go")
  (data (i32.const 100) "exiting\n")
  (func (export "_start")
    (i64.store (i32.const 280) (i64.const 100000000))
    (i32.store (i32.const 272) (i32.const 1))
    (block $done
      (loop $again
        (br_if $done (i32.eqz (call $stat (i32.const 3) (i32.const 0) (i32.const 64) (i32.const 2) (i32.const 512))))
        (drop (call $poll (i32.const 256) (i32.const 768) (i32.const 1) (i32.const 1000)))
        (br $again)))
    (i32.store (i32.const 0) (i32.const 100))
    (i32.store (i32.const 4) (i32.const 8))
    (drop (call $write (i32.const 1) (i32.const 0) (i32.const 1) (i32.const 8)))
    (call $exit (i32.const 0))))"#;

/// The audit policy of the private API server: every request of a node identity, at Metadata
/// level, logged once when its response is complete (and once when a watch's response starts,
/// deduplicated by auditID when counted).
const AUDIT_POLICY: &str = "apiVersion: audit.k8s.io/v1
kind: Policy
omitStages: [RequestReceived]
rules:
- level: Metadata
  userGroups: [\"system:nodes\"]
- level: None
";

// ------------------------------------------------------------------------ the private cluster

/// A cluster of this test process alone: `deploy/local-cluster up` with its own directory and
/// ports, brought down (every process it started, by PID) when dropped.
struct PrivateCluster {
    dir: PathBuf,
    env: Vec<(String, String)>,
    cluster: Option<&'static Cluster>,
}

/// Eight consecutive ports in 24000-31999 that nothing listens on (the shared cluster and the
/// other test files use none of that range). Below Linux's ephemeral range (32768 and up by
/// default): while etcd is stopped, the API server dials its port again and again, and a dial
/// from an ephemeral port can pick the very port it dials and connect to itself (TCP
/// simultaneous open), holding it so that etcd cannot bind it when it starts again (seen in CI).
fn free_ports() -> [u16; 8] {
    const LOW: u16 = 24000;
    const SPAN: u16 = 7990;
    let free = |port: u16| std::net::TcpListener::bind(("127.0.0.1", port)).is_ok();
    let ephemeral_low: u16 = std::fs::read_to_string("/proc/sys/net/ipv4/ip_local_port_range")
        .ok()
        .and_then(|r| r.split_whitespace().next()?.parse().ok())
        .unwrap_or(32768);
    assert!(
        LOW + SPAN + 10 <= ephemeral_low,
        "the ephemeral port range starts at {ephemeral_low}, inside {LOW}-{}",
        LOW + SPAN + 9
    );
    // Start from a place of this process's own, so two runs at once try different blocks.
    let offset = (std::process::id() % 799) as u16 * 10;
    (0..800u16)
        .map(|i| LOW + (offset + i * 10) % SPAN)
        .find_map(|base| {
            let ports: [u16; 8] = std::array::from_fn(|i| base + i as u16);
            ports.iter().all(|&p| free(p)).then_some(ports)
        })
        .expect("eight free ports in 24000-31999")
}

impl PrivateCluster {
    fn up() -> PrivateCluster {
        let dir = workspace_root()
            .join("target/chaos-cp")
            .join(unique_name("cp"));
        std::fs::create_dir_all(&dir).expect("private cluster dir");
        let policy = dir.join("audit-policy.yaml");
        std::fs::write(&policy, AUDIT_POLICY).expect("audit policy written");
        let ports = free_ports();
        let names = [
            "LC_ETCD_PORT",
            "LC_ETCD_PEER_PORT",
            "LC_APISERVER_PORT",
            "LC_CONTROLLER_MANAGER_PORT",
            "LC_SCHEDULER_PORT",
            "LC_REGISTRY_PORT",
            "LC_METRICS_SERVER_PORT",
            "LC_SECURE_REGISTRY_PORT",
        ];
        let mut env: Vec<(String, String)> = names
            .iter()
            .zip(ports)
            .map(|(n, p)| (n.to_string(), p.to_string()))
            .collect();
        env.push(("LOCAL_CLUSTER_DIR".into(), dir.display().to_string()));
        env.push((
            "LC_SKIP".into(),
            "secure-registry containerd metrics-server images".into(),
        ));
        env.push(("LC_AUDIT_POLICY".into(), policy.display().to_string()));
        // From here on, a failure brings down whatever `up` started.
        let mut private = PrivateCluster {
            dir: dir.clone(),
            env,
            cluster: None,
        };
        let out = private.script(&["up"]);
        assert!(
            out.status.success(),
            "deploy/local-cluster up (private, {}) failed:\n{}",
            dir.display(),
            String::from_utf8_lossy(&out.stderr)
        );
        private.cluster = Some(Cluster::open(&dir).unwrap_or_else(|e| panic!("{e:#}")));
        private
    }

    fn cluster(&self) -> &'static Cluster {
        self.cluster.expect("the private cluster is up")
    }

    /// Runs deploy/local-cluster with this cluster's directory and ports.
    fn script(&self, args: &[&str]) -> std::process::Output {
        Command::new(workspace_root().join("deploy/local-cluster"))
            .args(args)
            .envs(self.env.iter().map(|(k, v)| (k, v)))
            .output()
            .expect("deploy/local-cluster runs")
    }

    /// `stop-component NAME` or `start-component NAME`; panics with the script's words.
    fn component(&self, verb: &str, name: &str) {
        let out = self.script(&[&format!("{verb}-component"), name]);
        assert!(
            out.status.success(),
            "deploy/local-cluster {verb}-component {name}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    /// The requests of user `user` the audit log holds, one per request (auditID).
    fn requests_of(&self, user: &str) -> Vec<Request> {
        let text = std::fs::read_to_string(self.dir.join("logs/audit.log")).unwrap_or_default();
        let mut by_id: BTreeMap<String, Request> = BTreeMap::new();
        for line in text.lines() {
            let Ok(entry) = serde_json::from_str::<serde_json::Value>(line) else {
                continue; // a line being written
            };
            if entry["user"]["username"] != user {
                continue;
            }
            let s = |v: &serde_json::Value| v.as_str().unwrap_or("").to_string();
            let Ok(at) = DateTime::parse_from_rfc3339(&s(&entry["requestReceivedTimestamp"]))
            else {
                continue;
            };
            by_id.entry(s(&entry["auditID"])).or_insert(Request {
                at: at.with_timezone(&Utc),
                verb: s(&entry["verb"]),
                resource: match s(&entry["objectRef"]["subresource"]).as_str() {
                    "" => s(&entry["objectRef"]["resource"]),
                    sub => format!("{}/{sub}", s(&entry["objectRef"]["resource"])),
                },
                name: s(&entry["objectRef"]["name"]),
            });
        }
        let mut list: Vec<Request> = by_id.into_values().collect();
        list.sort_by_key(|r| r.at);
        list
    }
}

impl Drop for PrivateCluster {
    fn drop(&mut self) {
        let out = self.script(&["down"]);
        if !out.status.success() {
            eprintln!(
                "private cluster down failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
        }
        // After a failure the logs (the audit log among them) stay for a look; etcd's data and
        // the registry's blobs go in any case.
        let gone = if std::thread::panicking() {
            self.dir.join("data")
        } else {
            self.dir.clone()
        };
        let _ = std::fs::remove_dir_all(gone);
    }
}

#[derive(Debug, Clone)]
struct Request {
    at: DateTime<Utc>,
    verb: String,
    resource: String,
    name: String,
}

// ------------------------------------------------------------------------ observations

/// The lines a container wrote, from its CRI log files (`<n>.log`, oldest first) in the
/// agent's pod log directory, with the names of those files.
fn container_log(agent: &Agent, pod: &Pod, container: &str) -> (Vec<String>, Vec<String>) {
    let meta = &pod.metadata;
    let dir = agent.dir.join("logs").join(format!(
        "{}_{}_{}",
        meta.namespace.as_deref().unwrap_or_default(),
        meta.name.as_deref().unwrap_or_default(),
        meta.uid.as_deref().unwrap_or_default()
    ));
    let dir = dir.join(container);
    let mut files: Vec<String> = std::fs::read_dir(&dir)
        .map(|d| {
            d.filter_map(|e| e.ok())
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .collect()
        })
        .unwrap_or_default();
    files.sort();
    let mut lines = Vec::new();
    for f in &files {
        let text = std::fs::read_to_string(dir.join(f)).unwrap_or_default();
        // CRI format: `<time> <stream> <P|F> <text>`.
        lines.extend(
            text.lines()
                .filter_map(|l| l.splitn(4, ' ').nth(3))
                .map(str::to_string),
        );
    }
    (lines, files)
}

/// The ticker's counters, checked to be 0, 1, 2, ... without a repeat or a gap: one instance
/// ran, from its start, without a break. Returns how many lines it wrote.
fn assert_ticked_without_break(agent: &Agent, pod: &Pod) -> usize {
    let name = pod.metadata.name.as_deref().unwrap_or_default();
    let (lines, files) = container_log(agent, pod, "tick");
    assert_eq!(
        files,
        vec!["0.log".to_string()],
        "{name}: one log file, of one container instance"
    );
    for (i, line) in lines.iter().enumerate() {
        let n: usize = line
            .strip_prefix("tick ")
            .and_then(|n| n.parse().ok())
            .unwrap_or_else(|| panic!("{name}: line {i} is {line:?}, not a tick"));
        assert_eq!(
            n, i,
            "{name}: tick {n} at line {i}: the guest restarted or a second instance ran"
        );
    }
    lines.len()
}

/// (container ID, restart count) of container `c`.
fn container_identity(pod: &Pod, c: &str) -> (String, i32) {
    let status = pod
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|s| s.name == c))
        .unwrap_or_else(|| panic!("no status of {c} in {:?}", pod.status));
    (
        status.container_id.clone().unwrap_or_default(),
        status.restart_count,
    )
}

fn waiting_reason(pod: &Pod, c: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|s| s.name == c)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .clone()
}

fn is_running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .is_some_and(|cs| {
            !cs.is_empty()
                && cs
                    .iter()
                    .all(|c| c.state.as_ref().is_some_and(|s| s.running.is_some()))
        })
}

/// When the node's Ready condition last changed.
fn ready_transition(node: &Node) -> Option<DateTime<Utc>> {
    node.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == "Ready")?
        .last_transition_time
        .as_ref()
        .map(|t| t.0)
}

// ------------------------------------------------------------------------ the cases

/// What the test keeps of the pods that run through every outage.
struct Tickers {
    pods: HashMap<String, (String, String)>, // name -> (uid, container ID)
}

async fn start_tickers(agent: &Agent, ns: &TestNamespace, image: &str) -> Tickers {
    let mut pods = HashMap::new();
    for i in 0..TICKERS {
        let name = format!("ticker-{i}");
        ns.create_bound_pod(
            agent,
            &name,
            serde_json::json!({}),
            serde_json::json!({
                "restartPolicy": "Always",
                "containers": [{"name": "tick", "image": image}],
            }),
        )
        .await;
    }
    for i in 0..TICKERS {
        let name = format!("ticker-{i}");
        let pod = ns
            .wait_pod(agent, &name, "ticker running", is_running)
            .await;
        let (id, restarts) = container_identity(&pod, "tick");
        assert_eq!(restarts, 0);
        pods.insert(name, (pod.metadata.uid.clone().unwrap(), id));
    }
    Tickers { pods }
}

/// Every ticker is the pod it was (same UID), its container the one it was (same ID, no
/// restart), and its guest ticked without a break. Returns the fewest lines a ticker wrote.
async fn assert_tickers_undisturbed(agent: &Agent, ns: &TestNamespace, tickers: &Tickers) -> usize {
    let list = ns.pods().list(&Default::default()).await.expect("pods");
    let mut fewest = usize::MAX;
    for (name, (uid, id)) in &tickers.pods {
        let pods: Vec<&Pod> = list
            .items
            .iter()
            .filter(|p| p.metadata.name.as_deref() == Some(name))
            .collect();
        assert_eq!(pods.len(), 1, "{name}: one pod");
        let pod = pods[0];
        assert_eq!(pod.metadata.uid.as_ref(), Some(uid), "{name}: the same pod");
        assert!(is_running(pod), "{name} runs: {:?}", pod.status);
        assert_eq!(
            container_identity(pod, "tick"),
            (id.clone(), 0),
            "{name}: the same container, never restarted"
        );
        fewest = fewest.min(assert_ticked_without_break(agent, pod));
    }
    fewest
}

/// What one outage showed, for the report.
#[derive(Debug)]
struct OutageFigures {
    component: &'static str,
    ready_after: Duration,
    node_unknown_seen: bool,
    requests: BTreeMap<String, usize>,
}

/// Stops `component` (kube-apiserver or etcd) for [`OUTAGE`] while the tickers run and a waiter
/// pod ends, starts it again, and checks what must hold.
async fn outage(
    private: &PrivateCluster,
    agent: &Agent,
    ns: &TestNamespace,
    tickers: &Tickers,
    waiter_image: &str,
    component: &'static str,
) -> OutageFigures {
    let cluster = private.cluster();
    let user = format!("system:node:{}", agent.name);
    let nodes: Api<Node> = Api::all(cluster.admin().await);

    // A pod that will end while the component is away.
    let waiter = format!("waiter-{component}");
    let go_dir = agent.dir.join(format!("go-{component}"));
    std::fs::create_dir_all(&go_dir).unwrap();
    ns.create_bound_pod(
        agent,
        &waiter,
        serde_json::json!({}),
        serde_json::json!({
            "containers": [{"name": "wait", "image": waiter_image,
                            "volumeMounts": [{"name": "go", "mountPath": "/go"}]}],
            "volumes": [{"name": "go", "hostPath": {"path": go_dir, "type": "Directory"}}],
        }),
    )
    .await;
    let waiter_pod = ns
        .wait_pod(agent, &waiter, "the waiter running", is_running)
        .await;
    let before = assert_tickers_undisturbed(agent, ns, tickers).await;

    private.component("stop", component);
    let stopped = Instant::now();
    let stopped_at = Utc::now();
    // While it is away: the waiter's guest ends (its pod's status cannot be written now)...
    std::fs::write(go_dir.join("go"), b"").unwrap();
    wait_for("the waiter's guest to end", TEST_TIMEOUT, || async {
        let (lines, _) = container_log(agent, &waiter_pod, "wait");
        lines.iter().any(|l| l == "exiting").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    // ...and the tickers keep ticking.
    let during = wait_for("the tickers to tick while it is away", OUTAGE, || async {
        let fewest = tickers
            .pods
            .keys()
            .map(|name| {
                let p: Pod = serde_json::from_value(serde_json::json!({"metadata": {
                    "name": name, "namespace": ns.name, "uid": tickers.pods[name].0}}))
                .unwrap();
                container_log(agent, &p, "tick").0.len()
            })
            .min()
            .unwrap_or(0);
        (fewest >= before + 10).then_some(fewest)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    // The outage lasts OUTAGE however quickly the above was seen: its length is the scenario.
    tokio::time::sleep(OUTAGE.saturating_sub(stopped.elapsed())).await;
    // While etcd was away the API server held each request up to its own timeout (60 s); the
    // node must not wait that long on a heartbeat: it gives a renewal one renew interval (10 s)
    // and tries again, as the kubelet does. At least one attempt per 20 s reached the API
    // server (a heartbeat waiting on the server's timeout makes one per minute).
    if component == "etcd" {
        let attempts = private
            .requests_of(&user)
            .iter()
            .filter(|r| r.resource == "leases" && r.at >= stopped_at)
            .count();
        let least = (OUTAGE.as_secs() / 20) as usize;
        assert!(
            attempts >= least,
            "{attempts} lease requests while etcd was away (at least {least})"
        );
    }
    // Requests are counted from the moment the component starts again (the agent's first
    // writes can land before the start-up check below sees it healthy).
    let returned_at = Utc::now();
    private.component("start", component);
    let returned = Instant::now();

    // The node comes back Ready by itself: Ready, and its lease renewed after the return.
    let leases: Api<Lease> = Api::namespaced(cluster.admin().await, "kube-node-lease");
    let unknown_seen = AtomicBool::new(false);
    let ready_now = || async {
        let node = nodes.get(&agent.name).await.ok()?;
        let ready = node_condition(&node, "Ready");
        if ready.as_deref() != Some("True") {
            unknown_seen.store(true, Ordering::Relaxed);
        }
        let lease = leases.get(&agent.name).await.ok()?;
        let renewed = lease.spec?.renew_time?.0;
        (ready.as_deref() == Some("True") && renewed >= returned_at).then_some(node)
    };
    wait_for("the node Ready again", TEST_TIMEOUT, ready_now)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let ready_after = returned.elapsed();

    // The status written while it was away catches up: the waiter Succeeded, not recreated.
    let done = ns
        .wait_pod(agent, &waiter, "the waiter's status written", |p| {
            p.status.as_ref().and_then(|s| s.phase.as_deref()) == Some("Succeeded")
        })
        .await;
    assert_eq!(
        done.metadata.uid, waiter_pod.metadata.uid,
        "the same waiter pod"
    );

    // Count the node's requests in the first COUNT_WINDOW after the return (the lease renewals
    // every 10 s show the window is over).
    let window_end = returned_at + chrono_secs(COUNT_WINDOW.as_secs() as i64);
    wait_for(
        "the node's requests past the counting window",
        COUNT_WINDOW + TEST_TIMEOUT,
        || async {
            // Whether the controller manager marks the node meanwhile, for the figures.
            let _ = ready_now().await;
            private
                .requests_of(&user)
                .iter()
                .any(|r| r.at > window_end)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let after: Vec<Request> = private
        .requests_of(&user)
        .into_iter()
        .filter(|r| r.at >= returned_at && r.at <= window_end)
        .collect();
    let mut requests: BTreeMap<String, usize> = BTreeMap::new();
    for r in &after {
        *requests
            .entry(format!("{} {}", r.verb, r.resource))
            .or_default() += 1;
    }
    eprintln!(
        "{component} outage: Ready {ready_after:?} after the return (NotReady/Unknown seen: \
         {unknown_seen:?}); the node's requests in the {COUNT_WINDOW:?} after it: {requests:#?}"
    );

    // No resync storm: the pods are listed again at most twice (one relist of the watch, one
    // more if the first is cut short), not once per pod; no pod is fetched one by one more
    // than twice; status is written for the pods whose status changed (the waiter) and at most
    // twice more per pod (the controller manager may have marked them not ready).
    let lists = after.iter().filter(|r| r.verb == "list").count();
    let pod_lists = after
        .iter()
        .filter(|r| r.verb == "list" && r.resource == "pods")
        .count();
    assert!(
        pod_lists <= 2,
        "{pod_lists} LISTs of pods after the return: {after:#?}"
    );
    // pods, runtimeclasses, and a spare per watched kind (a relist cut short).
    assert!(lists <= 4, "{lists} LISTs after the return: {requests:#?}");
    let mut gets: HashMap<&str, usize> = HashMap::new();
    let mut status_writes: HashMap<&str, usize> = HashMap::new();
    for r in &after {
        if r.resource == "pods" && r.verb == "get" {
            *gets.entry(&r.name).or_default() += 1;
        }
        if r.resource == "pods/status" && r.verb == "patch" {
            *status_writes.entry(&r.name).or_default() += 1;
        }
    }
    for (pod, n) in &gets {
        assert!(*n <= 2, "pod {pod} fetched {n} times after the return");
    }
    for (pod, n) in &status_writes {
        assert!(
            *n <= 3,
            "pod {pod}'s status written {n} times after the return"
        );
    }
    let pods_total = TICKERS + 1;
    let total: usize = requests.values().sum();
    // Heartbeats (a lease renewal and a node status every 10 s: ~12 in a minute), the relists
    // and watches, events, and up to 3 status writes per pod. A storm is far above.
    let bound = 40 + 3 * pods_total;
    assert!(
        total <= bound,
        "{total} requests in the {COUNT_WINDOW:?} after the return (bound {bound}): {requests:#?}"
    );

    // Ready at the end of the window too (the controller manager may have marked it Unknown
    // meanwhile: the node corrects that by itself).
    let node = wait_for("the node Ready after the window", TEST_TIMEOUT, ready_now)
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let transitioned = ready_transition(&node).is_some_and(|t| t >= stopped_at);
    // The tickers never noticed; they ticked all along (no duplicate, no restart).
    let now = assert_tickers_undisturbed(agent, ns, tickers).await;
    assert!(now > during, "the tickers tick after the return");
    // One pod per name, no stray pod.
    let names: Vec<String> = ns
        .pods()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(
        names.len(),
        names.iter().collect::<std::collections::HashSet<_>>().len(),
        "{names:?}"
    );
    OutageFigures {
        component,
        ready_after,
        node_unknown_seen: unknown_seen.load(Ordering::Relaxed) || transitioned,
        requests,
    }
}

fn chrono_secs(s: i64) -> k8s_openapi::chrono::TimeDelta {
    k8s_openapi::chrono::TimeDelta::seconds(s)
}

/// The registry stops while a pod pulls: ErrImagePull, then ImagePullBackOff with growing
/// delays between attempts, then Running once the registry is back; the same pod throughout.
async fn registry_outage(private: &PrivateCluster, agent: &Agent, ns: &TestNamespace) {
    // An image no node has: a ticker with a data segment of this run only.
    let image = push_wat_to(
        private.cluster(),
        "chaos-pull",
        &TICKER.replace(
            "(memory (export \"memory\") 1)",
            &format!(
                "(memory (export \"memory\") 1)\n  (data (i32.const 4000) \"{}\")",
                unique_name("pull")
            ),
        ),
    );
    private.component("stop", "registry");
    let pod = ns
        .create_bound_pod(
            agent,
            "puller",
            serde_json::json!({}),
            serde_json::json!({
                "restartPolicy": "Always",
                "containers": [{"name": "tick", "image": image}],
            }),
        )
        .await;
    // The agent's Pulling event counts its attempts; its lastTimestamp is when the agent made
    // the latest. Record each attempt's time as the count grows, and the waiting reasons seen.
    let events: Api<Event> = Api::namespaced(ns.client.clone(), &ns.name);
    let pods = ns.pods();
    let mut attempts: BTreeMap<i32, DateTime<Utc>> = BTreeMap::new();
    let mut reasons: Vec<String> = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(300);
    while attempts.len() < 3 || !attempts.contains_key(&3) {
        assert!(
            Instant::now() < deadline,
            "three pull attempts not seen: {attempts:?}, reasons {reasons:?}\n{}",
            agent.log_tail()
        );
        for e in events.list(&Default::default()).await.unwrap().items {
            if e.involved_object.name.as_deref() == Some("puller")
                && e.reason.as_deref() == Some("Pulling")
            {
                if let (Some(count), Some(at)) = (e.count, e.last_timestamp) {
                    attempts.entry(count).or_insert(at.0);
                }
            }
        }
        if let Some(p) = pods.get_opt("puller").await.unwrap() {
            if let Some(r) = waiting_reason(&p, "tick") {
                if reasons.last() != Some(&r) {
                    reasons.push(r);
                }
            }
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
    assert!(
        reasons.iter().any(|r| r == "ErrImagePull"),
        "ErrImagePull seen: {reasons:?}"
    );
    assert!(
        reasons.iter().any(|r| r == "ImagePullBackOff"),
        "ImagePullBackOff seen: {reasons:?}"
    );
    let (t1, t2, t3) = (attempts[&1], attempts[&2], attempts[&3]);
    let (d1, d2) = (t2 - t1, t3 - t2);
    eprintln!("registry outage: pull attempts at {attempts:?}: gaps {d1} then {d2}");
    assert!(
        d2 > d1,
        "the delay between pull attempts grows (the kubelet's backoff): {d1} then {d2}"
    );
    let back = ns.event_reasons("puller").await;
    assert!(
        back.iter().any(|r| r == "BackOff"),
        "a BackOff event: {back:?}"
    );

    private.component("start", "registry");
    let running = ns
        .wait_pod(
            agent,
            "puller",
            "the puller running once the registry is back",
            is_running,
        )
        .await;
    assert_eq!(running.metadata.uid, pod.metadata.uid, "the same pod");
    assert_eq!(container_identity(&running, "tick").1, 0, "no restart");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn node_lives_through_control_plane_and_registry_outages() {
    // Declared first, dropped last: the agent and namespace go while the cluster is up.
    let private = PrivateCluster::up();
    let cluster = private.cluster();
    let ticker = push_wat_to(cluster, "chaos-ticker", TICKER);
    let waiter = push_wat_to(cluster, "chaos-waiter", WAITER);
    // The machine's disk is shared with builds that come and go; an eviction of a ticker for
    // a moment of disk pressure is not what this test is about.
    let agent = test_node_on(
        cluster,
        "cp-outage",
        &["--eviction-hard=memory.available<1Mi,nodefs.available<1Mi,nodefs.inodesFree<1%,imagefs.available<1Mi"],
    )
    .await;
    let ns = TestNamespace::new_on(cluster, "cp-outage").await;

    registry_outage(&private, &agent, &ns).await;

    let tickers = start_tickers(&agent, &ns, &ticker).await;
    let mut figures = Vec::new();
    for component in ["kube-apiserver", "etcd"] {
        figures.push(outage(&private, &agent, &ns, &tickers, &waiter, component).await);
    }
    for f in &figures {
        eprintln!(
            "figures: {} away {OUTAGE:?}: node Ready {:?} after the return (NotReady/Unknown \
             seen after it: {}), {} node requests in the first {COUNT_WINDOW:?}: {:?}",
            f.component,
            f.ready_after,
            f.node_unknown_seen,
            f.requests.values().sum::<usize>(),
            f.requests
        );
    }
}

// ------------------------------------------------------------------------ SIGKILL of the agent

/// The agent killed (SIGKILL) in the middle of a pod's graceful stop, and started again: the
/// deleted pod ends gone from the API server and its guest is not left running; the pod that
/// was not deleted runs on, the same container, never restarted. (The shared cluster: nothing
/// of the control plane is stopped here.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn killed_in_the_middle_of_a_graceful_stop_the_pod_ends_gone_and_no_guest_is_left() {
    let cluster = Cluster::get();
    let ticker = push_wat_to(cluster, "chaos-ticker", TICKER);
    let mut agent = integration_tests::test_node("kill-stop", &[]).await;
    let ns = TestNamespace::new("kill-stop").await;
    for name in ["stopping", "staying"] {
        ns.create_bound_pod(
            &agent,
            name,
            serde_json::json!({}),
            serde_json::json!({
                "restartPolicy": "Always",
                // Long enough that the kill lands while the guest still has its grace.
                "terminationGracePeriodSeconds": 60,
                "containers": [{"name": "tick", "image": ticker}],
            }),
        )
        .await;
    }
    let stopping = ns
        .wait_pod(&agent, "stopping", "stopping running", is_running)
        .await;
    let staying = ns
        .wait_pod(&agent, "staying", "staying running", is_running)
        .await;
    let staying_id = container_identity(&staying, "tick");

    // Delete with the pod's grace; once the agent has begun stopping it, kill the agent.
    ns.pods()
        .delete("stopping", &Default::default())
        .await
        .expect("pod deleted");
    ns.wait_events(&agent, "stopping", "the agent stopping the pod", |events| {
        events.iter().any(|(reason, _)| reason == "Killing")
    })
    .await;
    let ticks_at_kill = container_log(&agent, &stopping, "tick").0.len();
    agent.kill9();
    let ticking = container_log(&agent, &stopping, "tick").0.len();
    assert!(
        ns.pods().get_opt("stopping").await.unwrap().is_some(),
        "the pod was still there when the agent was killed (mid-stop): ticks {ticks_at_kill}..{ticking}"
    );
    agent.spawn().unwrap();

    // The deleted pod ends gone, with no guest of it left in the runtime.
    let pods = ns.pods();
    wait_for("the deleted pod gone", TEST_TIMEOUT, || async {
        pods.get_opt("stopping")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let uid = stopping.metadata.uid.clone().unwrap();
    wait_for(
        "no container of the deleted pod running",
        TEST_TIMEOUT,
        || async {
            let (code, body) = integration_tests::kubelet_get(&agent, "/runningpods/");
            (code == 200 && !body.contains(&uid)).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let ended = container_log(&agent, &stopping, "tick").0.len();

    // The other pod: the same container, never restarted, one instance all along.
    let staying_now = ns
        .wait_pod(&agent, "staying", "staying running", is_running)
        .await;
    assert_eq!(container_identity(&staying_now, "tick"), staying_id);
    let staying_lines = assert_ticked_without_break(&agent, &staying_now);
    // While the staying guest ticks three more times, the deleted pod's guest writes nothing
    // (a guest of it left running would tick too).
    wait_for("the staying guest ticking on", TEST_TIMEOUT, || async {
        (container_log(&agent, &staying_now, "tick").0.len() >= staying_lines + 3).then_some(())
    })
    .await
    .unwrap();
    assert_eq!(
        container_log(&agent, &stopping, "tick").0.len(),
        ended,
        "the deleted pod's guest still writes"
    );
    let names: Vec<String> = ns
        .pods()
        .list(&Default::default())
        .await
        .unwrap()
        .items
        .into_iter()
        .filter_map(|p| p.metadata.name)
        .collect();
    assert_eq!(names, vec!["staying".to_string()]);
}
