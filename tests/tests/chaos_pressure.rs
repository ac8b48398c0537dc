//! Node pressure while pods churn (issue #15): a test node's disk filled by a hostile neighbour
//! and freed, and its pods' memory raised over allocatable and brought back, twice each, while a
//! churn of short jobs, crash loops and tickers runs on it ([`integration_tests::pressure`]).
//!
//! What must hold, as the kubelet: the condition goes True with the controller manager's taint;
//! pods are evicted Failed/Evicted with the kubelet's messages, BestEffort before Guaranteed;
//! new pods are refused at admission while the node has the condition (the kubelet's eviction
//! admit handler); the condition goes False after the transition period and the churn's new
//! pods run again; every pod is accounted for, no guest left running for a pod that is not;
//! the agent never restarted and its fds did not grow from one cycle to the next.
//!
//! Both signals are the test's own: disk is a tmpfs of the test node's own (`--root-dir`), and
//! memory is `allocatableMemory.available` (the pods' memory against the node's allocatable,
//! which `--system-reserved` makes small), not the host's free memory, so other test binaries
//! running at the same time cannot raise or clear it.

use std::time::{Duration, Instant};

use integration_tests::pressure::{
    evicted_by_pressure, message, reason, refused_for, running_guests, Churn, EvictionOrder,
};
use integration_tests::soak::proc_sample;
use integration_tests::{
    example_image, has_taint, node_condition, phase, test_node, test_node_on_tmpfs, wait_for,
    Agent, Cluster, TestNamespace, Tmpfs, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::ListParams;
use kube::Api;

/// Pressure cycles per test: two, so a leak per cycle shows as a difference between them.
const CYCLES: usize = 2;
/// Fds the agent may hold more after the second cycle than after the first, both measured with
/// no churn pod left: keep-alive connections come and go between the two (the API server's,
/// metrics-server's scrapes of the kubelet API, this test's own kubelet API calls); CI saw +6.
/// A leak of one fd per pod shows above it: a cycle churns 12 pods or more. (The leak test
/// proper, per pod over many cycles, is tests/tests/soak_smoke.rs.)
const FD_SLACK: u64 = 8;
/// How long the churn, evictions and refusals get to settle at the end.
const SETTLE: Duration = Duration::from_secs(90);

async fn wait_node(agent: &Agent, what: &str, check: impl Fn(&Node) -> bool) -> Node {
    let nodes: Api<Node> = Api::all(Cluster::get().admin().await);
    wait_for(what, TEST_TIMEOUT, || async {
        nodes.get_opt(&agent.name).await.ok()?.filter(|n| check(n))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()))
}

fn condition_message(node: &Node, kind: &str) -> String {
    node.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == kind))
        .and_then(|c| c.message.clone())
        .unwrap_or_default()
}

fn disruption_target(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "DisruptionTarget"))
        .is_some_and(|c| c.status == "True" && c.reason.as_deref() == Some("TerminationByKubelet"))
}

fn qos(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.qos_class.clone())
        .unwrap_or_default()
}

/// The pressure cycle's common end: the condition False after the transition period, its taint
/// gone, a pod the churn created after that running; returns the seconds it took.
async fn recovery(
    agent: &Agent,
    ns: &TestNamespace,
    churn: &Churn,
    condition: &str,
    taint: &str,
) -> f64 {
    let began = Instant::now();
    wait_node(agent, &format!("{condition} False again"), |n| {
        node_condition(n, condition).as_deref() == Some("False")
    })
    .await;
    let recovered = began.elapsed().as_secs_f64();
    wait_node(agent, &format!("the {taint} taint removed"), |n| {
        !has_taint(n, taint)
    })
    .await;
    // The churn resumes: one of its pods created from now on runs (or, a job, succeeds).
    let mark = churn.created();
    let api = ns.pods();
    let resumed = wait_for(
        "a churn pod created after the recovery running",
        TEST_TIMEOUT,
        || async {
            let log = churn.log.lock().expect("log").created.clone();
            let newer = &log[mark.min(log.len())..];
            let list = api
                .list(&ListParams::default().labels("churn=yes"))
                .await
                .ok()?;
            list.items
                .iter()
                .find(|p| {
                    newer.iter().any(|n| Some(n) == p.metadata.name.as_ref())
                        && matches!(phase(p), "Running" | "Succeeded")
                })
                .map(|p| p.metadata.name.clone())
        },
    )
    .await;
    if let Err(e) = resumed {
        panic!("{e}\nagent log:\n{}", agent.log_tail());
    }
    recovered
}

/// The agent's fds with no churn pod on the node (the churn paused and cleared, then resumed).
async fn quiet_fds(agent: &Agent, ns: &TestNamespace, churn: &Churn) -> u64 {
    if let Err(e) = churn.clear(&ns.pods(), agent).await {
        panic!("{e}\nagent log:\n{}", agent.log_tail());
    }
    // The fewest over two seconds: a connection that is being opened or closed is not held.
    let pid = agent.pid().expect("agent runs");
    let mut fds = u64::MAX;
    for _ in 0..8 {
        fds = fds.min(proc_sample(pid).expect("agent's /proc").fds);
        tokio::time::sleep(std::time::Duration::from_millis(250)).await;
    }
    churn.resume();
    fds
}

/// The end of a test: every pod accounted for, no guest left, the agent the same process.
async fn finish(
    agent: &mut Agent,
    ns: &TestNamespace,
    churn: Churn,
    own: &[String],
    own_deleted: &std::collections::BTreeSet<String>,
    pids: (Option<u32>, Option<u32>),
    fds: &[u64],
) {
    let api = ns.pods();
    if let Err(e) = churn.clear(&api, agent).await {
        panic!("{e}\nagent log:\n{}", agent.log_tail());
    }
    let log = churn.stop().await;
    let mut created = log.created.clone();
    created.extend(own.iter().cloned());
    let mut deleted = log.deleted.clone();
    deleted.extend(own_deleted.iter().cloned());
    let outcomes =
        integration_tests::pressure::account(&api, agent, &created, &deleted, SETTLE).await;
    let outcomes = outcomes.unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let mut last_seen = std::collections::BTreeMap::new();
    for outcome in log.last_seen.values() {
        *last_seen.entry(outcome.clone()).or_insert(0usize) += 1;
    }
    eprintln!(
        "pods created: {} (churn {}); outcomes {outcomes:?}; churn pods as last seen before deletion {last_seen:?}",
        created.len(),
        log.created.len()
    );
    // A churn pod seen Pending when it was deleted was never taken up by the node.
    assert!(
        !last_seen.contains_key("Pending") || last_seen["Pending"] <= 2,
        "churn pods left Pending: {last_seen:?}"
    );
    assert_eq!(agent.exited(), None, "the agent exited");
    assert_eq!(agent.pid(), pids.0, "the agent restarted");
    assert_eq!(agent.runtime_pid(), pids.1, "the Wasm runtime restarted");
    eprintln!("agent fds after each cycle, no churn pod on the node: {fds:?}");
    assert!(
        fds.windows(2).all(|w| w[1] <= w[0] + FD_SLACK),
        "the agent's fds grew from one pressure cycle to the next: {fds:?}"
    );
}

/// Keeps the neighbour's file large enough that `leave` bytes at most stay free: a hostile
/// neighbour that writes on while the node evicts (node-level reclaim or a pod's logs freeing
/// some space must not end the pressure the test is about).
fn top_up(tmpfs: &Tmpfs, path: &std::path::Path, leave: u64) {
    use std::io::Write;
    let free = tmpfs.usage().1;
    if free > leave {
        let mut f = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .expect("the neighbour's file");
        // The filesystem may be filled by someone else meanwhile: a short write is fine.
        let _ = f.write_all(&vec![0x5a; (free - leave) as usize]);
    }
}

fn guaranteed_ticker() -> serde_json::Value {
    serde_json::json!({"restartPolicy": "Always", "containers": [{
        "name": "ticker",
        "image": example_image("ticker"),
        "resources": {
            "limits": {"cpu": "50m", "memory": "32Mi"},
            "requests": {"cpu": "50m", "memory": "32Mi", "ephemeral-storage": "4Mi"},
        },
    }]})
}

fn best_effort_ticker() -> serde_json::Value {
    serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "ticker", "image": example_image("ticker")}]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn disk_filled_and_freed_while_pods_churn() {
    let (tmpfs, mut agent) = test_node_on_tmpfs(
        "chaos-disk",
        "64m",
        &[
            "--eviction-hard=nodefs.available<16Mi",
            "--eviction-pressure-transition-period=5s",
            "--housekeeping-interval=1s",
            "--node-status-update-frequency=1s",
        ],
    )
    .await;
    wait_node(&agent, "Ready, DiskPressure False", |n| {
        node_condition(n, "Ready").as_deref() == Some("True")
            && node_condition(n, "DiskPressure").as_deref() == Some("False")
    })
    .await;
    let pids = (agent.pid(), agent.runtime_pid());
    let ns = TestNamespace::new("chaos-disk").await;
    let churn = Churn::start(&ns, &agent.name);
    let order = EvictionOrder::start(&ns);
    let mut own = Vec::new();
    let mut fds = Vec::new();
    for cycle in 1..=CYCLES {
        let guaranteed = format!("guaranteed-{cycle}");
        let best_effort = format!("best-effort-{cycle}");
        ns.create_bound_pod(
            &agent,
            &guaranteed,
            serde_json::json!({}),
            guaranteed_ticker(),
        )
        .await;
        ns.create_bound_pod(
            &agent,
            &best_effort,
            serde_json::json!({}),
            best_effort_ticker(),
        )
        .await;
        own.extend([guaranteed.clone(), best_effort.clone()]);
        for name in [&guaranteed, &best_effort] {
            ns.wait_pod(&agent, name, "the pod running", |p| phase(p) == "Running")
                .await;
        }

        // A neighbour fills the node's filesystem to 4Mi free, below the 16Mi threshold.
        let neighbour = tmpfs.path.join(format!("neighbour-{cycle}"));
        let earlier = order.seen().len();
        let began = Instant::now();
        top_up(&tmpfs, &neighbour, 4 << 20);
        let node = wait_node(&agent, "DiskPressure True", |n| {
            node_condition(n, "DiskPressure").as_deref() == Some("True")
        })
        .await;
        let to_pressure = began.elapsed().as_secs_f64();
        let detail = condition_message(&node, "DiskPressure");
        assert!(detail.contains("nodefs.available"), "{detail}");
        wait_node(&agent, "the disk-pressure taint", |n| {
            has_taint(n, "node.kubernetes.io/disk-pressure")
        })
        .await;

        // While the node has the condition, a new pod is refused at admission, as the kubelet's
        // eviction admit handler does (every pod under disk pressure, whatever its QoS).
        let refused = format!("refused-{cycle}");
        ns.create_bound_pod(&agent, &refused, serde_json::json!({}), guaranteed_ticker())
            .await;
        own.push(refused.clone());
        let pod = ns
            .wait_pod(&agent, &refused, "the new pod refused", |p| {
                phase(p) == "Failed"
            })
            .await;
        assert!(refused_for(&pod, "DiskPressure"), "{:?}", pod.status);
        assert!(!disruption_target(&pod), "a refused pod is no disruption");

        // Evicting frees nothing the neighbour holds: the node evicts pod after pod, ranked as
        // the kubelet ranks them, until the Guaranteed one goes too.
        let api = ns.pods();
        let gone = wait_for("the Guaranteed pod evicted", TEST_TIMEOUT, || async {
            top_up(&tmpfs, &neighbour, 4 << 20);
            api.get_opt(&guaranteed)
                .await
                .ok()?
                .filter(evicted_by_pressure)
        })
        .await;
        let evicted = gone.unwrap_or_else(|e| {
            panic!(
                "{e}; evicted so far {:?}\nagent log:\n{}",
                order.seen(),
                agent.log_tail()
            )
        });
        assert!(
            message(&evicted).starts_with(
                "The node was low on resource: ephemeral-storage. Threshold quantity: 16Mi, available: "
            ),
            "{}",
            message(&evicted)
        );
        assert!(disruption_target(&evicted), "{:?}", evicted.status);
        // The recorder polls on its own: wait until it has seen what the wait above saw.
        let seen = wait_for("the recorder to see the eviction", TEST_TIMEOUT, || async {
            let seen = order.seen();
            seen.contains(&guaranteed)
                .then(|| seen[earlier.min(seen.len())..].to_vec())
        })
        .await
        .expect("the recorder sees every eviction");
        let at = |name: &str| seen.iter().position(|n| n == name);
        let guaranteed_at = at(&guaranteed).expect("the Guaranteed pod's eviction seen");
        let best_effort_at = at(&best_effort).unwrap_or_else(|| {
            panic!("{best_effort} was not evicted before {guaranteed}: {seen:?}")
        });
        assert!(best_effort_at < guaranteed_at, "{seen:?}");
        // Every pod this cycle evicted before the Guaranteed one is BestEffort.
        for name in &seen[..guaranteed_at] {
            if let Some(p) = api.get_opt(name).await.expect("get") {
                assert_eq!(
                    qos(&p),
                    "BestEffort",
                    "{name} evicted before {guaranteed}: {seen:?}"
                );
                assert_eq!(reason(&p), "Evicted");
            }
        }

        // The neighbour leaves: the condition clears after the transition period.
        std::fs::remove_file(&neighbour).expect("removing the neighbour's file");
        let recovered = recovery(
            &agent,
            &ns,
            &churn,
            "DiskPressure",
            "node.kubernetes.io/disk-pressure",
        )
        .await;
        eprintln!(
            "cycle {cycle}: DiskPressure after {to_pressure:.1}s, False {recovered:.1}s after the disk was freed; evicted {seen:?}; churn pods so far {}",
            churn.created()
        );
        fds.push(quiet_fds(&agent, &ns, &churn).await);
    }
    finish(
        &mut agent,
        &ns,
        churn,
        &own,
        &Default::default(),
        pids,
        &fds,
    )
    .await;
    // The agent first: its drop finds the runtime by the pid file on the tmpfs, which is gone
    // once the tmpfs is unmounted (the runtime was left running when the tmpfs went first).
    drop(agent);
    drop(tmpfs);
}

/// MemTotal of /proc/meminfo, in KiB: the machine's size, which other tests do not change.
fn mem_total_kib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    text.lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemTotal")
}

/// What the pods of the memory test may hold together: `--system-reserved` takes the rest of
/// the machine, so the node's pods cgroup limit (and the provider's ceiling) is this size, and
/// allocatable is this less the 64Mi hard threshold: 256Mi.
const PODS_MIB: u64 = 320;
/// What each BestEffort hog holds: the Guaranteed hog and two of these stay under allocatable
/// (100 + 2 × 60 = 220 < 256); a third crosses it (280).
const HOG_MIB: u64 = 60;
const GUARANTEED_HOG_MIB: u64 = 100;

fn hog(mib: u64, guaranteed: bool) -> serde_json::Value {
    let mut container = serde_json::json!({
        "name": "hog",
        "image": example_image("memory-hog"),
        "args": [mib.to_string()],
    });
    if guaranteed {
        let r = serde_json::json!({"cpu": "50m", "memory": format!("{}Mi", mib + 28)});
        container["resources"] = serde_json::json!({"limits": r, "requests": r});
    }
    serde_json::json!({"restartPolicy": "Always", "containers": [container]})
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn memory_pressure_raised_and_cleared_while_pods_churn() {
    let reserved = format!(
        "--system-reserved=memory={}Ki",
        mem_total_kib().saturating_sub(PODS_MIB << 10)
    );
    let mut agent = test_node(
        "chaos-memory",
        &[
            &reserved,
            "--eviction-hard=memory.available<64Mi",
            // Long enough that the pods created right after the eviction that relieved the
            // pressure still meet the condition at admission on a busy machine.
            "--eviction-pressure-transition-period=15s",
            "--housekeeping-interval=1s",
            "--node-status-update-frequency=1s",
        ],
    )
    .await;
    wait_node(&agent, "Ready, MemoryPressure False", |n| {
        node_condition(n, "Ready").as_deref() == Some("True")
            && node_condition(n, "MemoryPressure").as_deref() == Some("False")
    })
    .await;
    let pids = (agent.pid(), agent.runtime_pid());
    let ns = TestNamespace::new("chaos-memory").await;
    let churn = Churn::start(&ns, &agent.name);
    let order = EvictionOrder::start(&ns);
    let mut own = Vec::new();
    let mut own_deleted = std::collections::BTreeSet::new();
    let mut fds = Vec::new();
    for cycle in 1..=CYCLES {
        let guaranteed = format!("guaranteed-{cycle}");
        ns.create_bound_pod(
            &agent,
            &guaranteed,
            serde_json::json!({}),
            hog(GUARANTEED_HOG_MIB, true),
        )
        .await;
        own.push(guaranteed.clone());
        let pod = ns
            .wait_pod(&agent, &guaranteed, "the Guaranteed hog running", |p| {
                phase(p) == "Running"
            })
            .await;
        assert_eq!(qos(&pod), "Guaranteed");
        // Two BestEffort hogs fit; the third crosses allocatable.
        let hogs: Vec<String> = (1..=3).map(|i| format!("hog-{cycle}-{i}")).collect();
        for name in &hogs[..2] {
            ns.create_bound_pod(&agent, name, serde_json::json!({}), hog(HOG_MIB, false))
                .await;
            own.push(name.clone());
            ns.wait_pod(&agent, name, "the hog holding its memory", |p| {
                phase(p) == "Running"
            })
            .await;
        }
        let began = Instant::now();
        ns.create_bound_pod(&agent, &hogs[2], serde_json::json!({}), hog(HOG_MIB, false))
            .await;
        own.push(hogs[2].clone());
        let node = wait_node(&agent, "MemoryPressure True", |n| {
            node_condition(n, "MemoryPressure").as_deref() == Some("True")
        })
        .await;
        let to_pressure = began.elapsed().as_secs_f64();
        // The pods' memory against allocatable, not the host's free memory, raised it.
        let detail = condition_message(&node, "MemoryPressure");
        assert!(detail.contains("allocatableMemory.available"), "{detail}");
        wait_node(&agent, "the memory-pressure taint", |n| {
            has_taint(n, "node.kubernetes.io/memory-pressure")
        })
        .await;
        // One BestEffort hog is evicted, with the kubelet's memory message; the Guaranteed one
        // (within its request) is not.
        let api = ns.pods();
        let evicted = wait_for("a BestEffort hog evicted", TEST_TIMEOUT, || async {
            for name in &hogs {
                if let Some(p) = api.get_opt(name).await.ok()?.filter(evicted_by_pressure) {
                    return Some(p);
                }
            }
            None
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}; evicted {:?}\nagent log:\n{}",
                order.seen(),
                agent.log_tail()
            )
        });
        let text = message(&evicted);
        assert!(
            text.starts_with(
                "The node was low on resource: memory. Threshold quantity: 64Mi, available: "
            ) && text.contains("Container hog was using ")
                && text.ends_with("request is 0, has larger consumption of memory."),
            "{text}"
        );
        assert!(disruption_target(&evicted), "{:?}", evicted.status);

        // Under memory pressure the kubelet refuses BestEffort pods only, and of those not the
        // ones that tolerate the memory-pressure taint (as the churn's pods do: they run on).
        let refused = format!("refused-{cycle}");
        let admitted = format!("admitted-{cycle}");
        let mut intolerant = best_effort_ticker();
        intolerant["tolerations"] = serde_json::json!([]);
        ns.create_bound_pod(&agent, &refused, serde_json::json!({}), intolerant)
            .await;
        ns.create_bound_pod(
            &agent,
            &admitted,
            serde_json::json!({}),
            guaranteed_ticker(),
        )
        .await;
        own.extend([refused.clone(), admitted.clone()]);
        let pod = ns
            .wait_pod(&agent, &refused, "the BestEffort pod refused", |p| {
                phase(p) == "Failed"
            })
            .await;
        assert!(refused_for(&pod, "MemoryPressure"), "{:?}", pod.status);
        ns.wait_pod(
            &agent,
            &admitted,
            "the Guaranteed pod admitted and running",
            |p| phase(p) == "Running",
        )
        .await;

        let recovered = recovery(
            &agent,
            &ns,
            &churn,
            "MemoryPressure",
            "node.kubernetes.io/memory-pressure",
        )
        .await;
        let seen = order.seen();
        assert!(
            !seen.contains(&guaranteed),
            "the Guaranteed hog was evicted: {seen:?}"
        );
        let pod = api.get(&guaranteed).await.expect("pod");
        assert_eq!(phase(&pod), "Running", "{:?}", pod.status);
        eprintln!(
            "cycle {cycle}: MemoryPressure {to_pressure:.1}s after the third hog was created, False {recovered:.1}s after it was evicted; evicted {seen:?}; churn pods so far {}",
            churn.created()
        );
        // This cycle's pods go, so the next one starts from the same memory.
        for name in own
            .iter()
            .filter(|n| n.ends_with(&format!("-{cycle}")) || n.contains(&format!("-{cycle}-")))
        {
            let _ = api.delete(name, &Default::default()).await;
            own_deleted.insert(name.clone());
        }
        let guests = wait_for(
            "this cycle's hogs gone from the runtime",
            TEST_TIMEOUT,
            || async {
                let left = running_guests(&agent);
                (!left.values().any(|n| {
                    n.starts_with("hog-")
                        || n.starts_with("guaranteed-")
                        || n.starts_with("admitted-")
                }))
                .then_some(())
            },
        )
        .await;
        if let Err(e) = guests {
            panic!(
                "{e}: {:?}\nagent log:\n{}",
                running_guests(&agent),
                agent.log_tail()
            );
        }
        fds.push(quiet_fds(&agent, &ns, &churn).await);
    }
    finish(&mut agent, &ns, churn, &own, &own_deleted, pids, &fds).await;
}
