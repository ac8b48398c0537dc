//! Node-pressure eviction against the real control plane: a test node whose `--root-dir` is a
//! small tmpfs of its own (so disk pressure is real and harmless), and a memory threshold set
//! just below what the host has free when the test starts.

use integration_tests::{
    example_image, has_taint, node_condition, phase, test_node_on_tmpfs, wait_for, Agent, Cluster,
    TestNamespace, Tmpfs, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;

/// The test's agent on a tmpfs root of `size`, Ready.
async fn node_on_tmpfs(what: &str, size: &str, extra: &[&str]) -> (Tmpfs, Agent) {
    let (tmpfs, agent) = test_node_on_tmpfs(what, size, extra).await;
    wait_ready(&agent).await;
    (tmpfs, agent)
}

async fn wait_ready(agent: &Agent) -> Node {
    let nodes: Api<Node> = Api::all(Cluster::get().admin().await);
    wait_for("the test node to be Ready", TEST_TIMEOUT, || async {
        let node = nodes.get_opt(&agent.name).await.ok()??;
        (node_condition(&node, "Ready").as_deref() == Some("True")).then_some(node)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()))
}

async fn wait_node(agent: &Agent, what: &str, check: impl Fn(&Node) -> bool) -> Node {
    let nodes: Api<Node> = Api::all(Cluster::get().admin().await);
    wait_for(what, TEST_TIMEOUT, || async {
        nodes.get_opt(&agent.name).await.ok()?.filter(|n| check(n))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()))
}

async fn create_pod(ns: &TestNamespace, agent: &Agent, name: &str, spec: serde_json::Value) -> Pod {
    let mut full =
        serde_json::json!({"restartPolicy": "Always", "terminationGracePeriodSeconds": 2});
    if let (Some(full), serde_json::Value::Object(spec)) = (full.as_object_mut(), spec) {
        full.extend(spec);
    }
    ns.create_bound_pod(agent, name, serde_json::json!({}), full)
        .await
}

fn reason(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.reason.as_deref())
        .unwrap_or("")
}

fn message(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.message.as_deref())
        .unwrap_or("")
}

/// A Guaranteed pod: requests equal limits for cpu and memory, and an ephemeral-storage
/// request larger than the little it writes.
fn guaranteed_ticker() -> serde_json::Value {
    let resources = serde_json::json!({"cpu": "100m", "memory": "64Mi"});
    serde_json::json!({"containers": [{
        "name": "ticker",
        "image": example_image("ticker"),
        "resources": {"limits": resources, "requests": {"cpu": "100m", "memory": "64Mi", "ephemeral-storage": "10Mi"}},
    }]})
}

#[tokio::test]
async fn disk_pressure_evicts_the_best_effort_pod_first_and_clears_when_space_returns() {
    let (tmpfs, agent) = node_on_tmpfs(
        "evict-disk",
        "64m",
        &[
            "--eviction-hard=nodefs.available<16Mi",
            "--eviction-pressure-transition-period=30s",
            "--housekeeping-interval=1s",
            "--node-status-update-frequency=1s",
        ],
    )
    .await;
    let node = wait_node(&agent, "DiskPressure False", |n| {
        node_condition(n, "DiskPressure").as_deref() == Some("False")
    })
    .await;
    assert!(!has_taint(&node, "node.kubernetes.io/disk-pressure"));
    let ns = TestNamespace::new("evict-disk").await;

    create_pod(&ns, &agent, "guaranteed", guaranteed_ticker()).await;
    let best_effort = create_pod(
        &ns,
        &agent,
        "best-effort",
        serde_json::json!({
            "containers": [{"name": "ticker", "image": example_image("ticker"), "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        }),
    )
    .await;
    for name in ["guaranteed", "best-effort"] {
        ns.wait_pod(&agent, name, "the pod running", |p| phase(p) == "Running")
            .await;
    }
    let qos = ns
        .pods()
        .get("guaranteed")
        .await
        .expect("pod")
        .status
        .and_then(|s| s.qos_class);
    assert_eq!(qos.as_deref(), Some("Guaranteed"));

    // The best-effort pod's emptyDir fills the disk to 8Mi free, below the 16Mi threshold.
    let uid = best_effort.metadata.uid.as_deref().expect("uid");
    let scratch = tmpfs
        .path
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/scratch");
    assert!(scratch.is_dir(), "{} is the emptyDir", scratch.display());
    let fill = tmpfs.usage().1.saturating_sub(8 << 20);
    std::fs::write(scratch.join("filler"), vec![7u8; fill as usize]).expect("filling the emptyDir");

    let node = wait_node(&agent, "DiskPressure True", |n| {
        node_condition(n, "DiskPressure").as_deref() == Some("True")
    })
    .await;
    let detail = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "DiskPressure"))
        .and_then(|c| c.message.clone());
    assert!(
        detail
            .as_deref()
            .is_some_and(|m| m.contains("nodefs.available")),
        "{detail:?}"
    );
    // The controller manager taints a node under disk pressure (TaintNodesByCondition).
    wait_node(&agent, "the disk-pressure taint", |n| {
        has_taint(n, "node.kubernetes.io/disk-pressure")
    })
    .await;

    let evicted = ns
        .wait_pod(&agent, "best-effort", "the best-effort pod evicted", |p| {
            phase(p) == "Failed"
        })
        .await;
    assert_eq!(reason(&evicted), "Evicted");
    assert!(
        message(&evicted).starts_with("The node was low on resource: ephemeral-storage. Threshold quantity: 16Mi, available: "),
        "{}",
        message(&evicted)
    );
    let disruption = evicted
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "DisruptionTarget").cloned());
    assert!(
        disruption.as_ref().is_some_and(
            |c| c.status == "True" && c.reason.as_deref() == Some("TerminationByKubelet")
        ),
        "{disruption:?}"
    );
    // The Evicted event is published asynchronously: waited for, not expected with the status.
    ns.wait_events(
        &agent,
        "best-effort",
        "an Evicted event naming ephemeral-storage",
        |events| {
            events
                .iter()
                .any(|(r, m)| r == "Evicted" && m.contains("ephemeral-storage"))
        },
    )
    .await;
    let guaranteed = ns.pods().get("guaranteed").await.expect("pod");
    assert_eq!(
        phase(&guaranteed),
        "Running",
        "the Guaranteed pod is not evicted first"
    );

    // The evicted pod's emptyDir was torn down: the space is back and the pressure clears.
    wait_for(
        "the evicted pod's emptyDir to be removed",
        TEST_TIMEOUT,
        || async { (!scratch.join("filler").exists()).then_some(()) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    wait_node(&agent, "DiskPressure False again", |n| {
        node_condition(n, "DiskPressure").as_deref() == Some("False")
    })
    .await;
    wait_node(&agent, "the disk-pressure taint removed", |n| {
        !has_taint(n, "node.kubernetes.io/disk-pressure")
    })
    .await;
    let guaranteed = ns.pods().get("guaranteed").await.expect("pod");
    assert_eq!(
        phase(&guaranteed),
        "Running",
        "the Guaranteed pod survived: {:?}",
        guaranteed.status
    );
    // The node's events are published asynchronously, the last one after the condition the
    // wait above saw: wait for all three.
    let wanted = [
        "EvictionThresholdMet",
        "NodeHasDiskPressure",
        "NodeHasNoDiskPressure",
    ];
    let seen = wait_for(
        "the node's EvictionThresholdMet, NodeHasDiskPressure and NodeHasNoDiskPressure events",
        TEST_TIMEOUT,
        || async {
            let reasons = node_event_reasons(&agent).await;
            wanted
                .iter()
                .all(|w| reasons.iter().any(|r| r == w))
                .then_some(())
        },
    )
    .await;
    if let Err(e) = seen {
        panic!(
            "{e}: the node's events are {:?}",
            node_event_reasons(&agent).await
        );
    }
}

/// The reasons of the Events about the test node (the kubelet records them in `default`).
async fn node_event_reasons(agent: &Agent) -> Vec<String> {
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(Cluster::get().admin().await, "default");
    let list = events
        .list(&Default::default())
        .await
        .map(|l| l.items)
        .unwrap_or_default();
    list.into_iter()
        .filter(|e| {
            e.involved_object.kind.as_deref() == Some("Node")
                && e.involved_object.name.as_deref() == Some(agent.name.as_str())
        })
        .filter_map(|e| e.reason)
        .collect()
}

/// MemAvailable of /proc/meminfo, in MiB.
fn mem_available_mib() -> u64 {
    let text = std::fs::read_to_string("/proc/meminfo").expect("/proc/meminfo");
    let kib: u64 = text
        .lines()
        .find_map(|l| l.strip_prefix("MemAvailable:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
        .expect("MemAvailable");
    kib / 1024
}

/// What the hog holds, and how far below the host's free memory the threshold is: the hog
/// crosses it at two thirds of its allocation, and other work on the machine would have to take
/// 2 GiB at once to cross it instead.
const HOG_MIB: u64 = 3072;
const BELOW_AVAILABLE_MIB: u64 = 2048;

#[tokio::test]
async fn memory_pressure_evicts_the_hog_before_the_guaranteed_pod() {
    let threshold = format!(
        "--eviction-hard=memory.available<{}Mi",
        mem_available_mib().saturating_sub(BELOW_AVAILABLE_MIB)
    );
    let agent = integration_tests::test_node(
        "evict-memory",
        &[
            &threshold,
            "--eviction-pressure-transition-period=30s",
            "--housekeeping-interval=1s",
            "--node-status-update-frequency=2s",
        ],
    )
    .await;
    wait_ready(&agent).await;
    wait_node(&agent, "MemoryPressure False", |n| {
        node_condition(n, "MemoryPressure").as_deref() == Some("False")
    })
    .await;
    let ns = TestNamespace::new("evict-memory").await;

    create_pod(&ns, &agent, "guaranteed", guaranteed_ticker()).await;
    ns.wait_pod(&agent, "guaranteed", "the guaranteed pod running", |p| {
        phase(p) == "Running"
    })
    .await;
    create_pod(
        &ns,
        &agent,
        "hog",
        serde_json::json!({"restartPolicy": "Never", "containers": [{"name": "hog", "image": example_image("memory-hog"), "args": [HOG_MIB.to_string()]}]}),
    )
    .await;

    let evicted = ns
        .wait_pod(&agent, "hog", "the memory hog evicted", |p| {
            phase(p) == "Failed"
        })
        .await;
    assert_eq!(reason(&evicted), "Evicted", "{:?}", evicted.status);
    let text = message(&evicted);
    assert!(
        text.starts_with("The node was low on resource: memory. Threshold quantity: "),
        "{text}"
    );
    assert!(
        text.contains("Container hog was using ")
            && text.ends_with("request is 0, has larger consumption of memory."),
        "{text}"
    );
    ns.wait_events(&agent, "hog", "an Evicted event", |events| {
        events.iter().any(|(r, _)| r == "Evicted")
    })
    .await;
    wait_node(&agent, "MemoryPressure reported", |n| {
        node_condition(n, "MemoryPressure").as_deref() == Some("True")
    })
    .await;
    // The controller manager taints a node under memory pressure (TaintNodesByCondition).
    wait_node(&agent, "the memory-pressure taint", |n| {
        has_taint(n, "node.kubernetes.io/memory-pressure")
    })
    .await;

    let guaranteed = ns.pods().get("guaranteed").await.expect("pod");
    assert_eq!(
        phase(&guaranteed),
        "Running",
        "the Guaranteed pod stays: {:?}",
        guaranteed.status
    );
    // Evicting the hog gave the memory back: the pressure clears after the transition period.
    wait_node(&agent, "MemoryPressure False again", |n| {
        node_condition(n, "MemoryPressure").as_deref() == Some("False")
    })
    .await;
    let guaranteed = ns.pods().get("guaranteed").await.expect("pod");
    assert_eq!(
        phase(&guaranteed),
        "Running",
        "the Guaranteed pod survived: {:?}",
        guaranteed.status
    );
}

#[tokio::test]
async fn an_emptydir_over_its_size_limit_evicts_its_pod() {
    let agent =
        integration_tests::test_node("evict-sizelimit", &["--housekeeping-interval=1s"]).await;
    let ns = TestNamespace::new("evict-sizelimit").await;
    let pod = create_pod(
        &ns,
        &agent,
        "writer",
        serde_json::json!({
            "containers": [{"name": "ticker", "image": example_image("ticker"), "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {"sizeLimit": "1Mi"}}],
        }),
    )
    .await;
    ns.wait_pod(&agent, "writer", "the pod running", |p| {
        phase(p) == "Running"
    })
    .await;
    // What the pod would write into its emptyDir: 2 MiB against a 1 MiB limit.
    let uid = pod.metadata.uid.as_deref().expect("uid");
    let scratch = agent
        .dir
        .join("root/pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/scratch");
    std::fs::write(scratch.join("big"), vec![3u8; 2 << 20]).expect("writing into the emptyDir");

    let evicted = ns
        .wait_pod(&agent, "writer", "the pod evicted", |p| {
            phase(p) == "Failed"
        })
        .await;
    assert_eq!(reason(&evicted), "Evicted");
    assert_eq!(
        message(&evicted),
        "Usage of EmptyDir volume \"scratch\" exceeds the limit \"1Mi\"."
    );
    ns.wait_events(
        &agent,
        "writer",
        "an Evicted event saying the limit was exceeded",
        |events| {
            events
                .iter()
                .any(|(r, m)| r == "Evicted" && m.contains("exceeds the limit"))
        },
    )
    .await;
}

#[tokio::test]
async fn a_container_over_its_ephemeral_storage_limit_evicts_its_pod() {
    let agent =
        integration_tests::test_node("evict-ephemeral", &["--housekeeping-interval=1s"]).await;
    let ns = TestNamespace::new("evict-ephemeral").await;
    // The ticker's log takes a 4 KiB block with its first line: over a 2Ki limit.
    create_pod(
        &ns,
        &agent,
        "logger",
        serde_json::json!({"containers": [{"name": "ticker", "image": example_image("ticker"), "resources": {"limits": {"ephemeral-storage": "2Ki"}}}]}),
    )
    .await;
    let evicted = ns
        .wait_pod(&agent, "logger", "the pod evicted", |p| {
            phase(p) == "Failed"
        })
        .await;
    assert_eq!(reason(&evicted), "Evicted");
    assert_eq!(
        message(&evicted),
        "Container ticker exceeded its local ephemeral storage limit \"2Ki\"."
    );
}

#[tokio::test]
async fn a_soft_threshold_raises_disk_pressure_at_once_and_evicts_after_its_grace_period() {
    let (tmpfs, agent) = node_on_tmpfs(
        "evict-soft",
        "64m",
        &[
            "--eviction-hard=nodefs.available<1Mi",
            "--eviction-soft=nodefs.available<16Mi",
            "--eviction-soft-grace-period=nodefs.available=20s",
            "--eviction-max-pod-grace-period=1",
            "--eviction-pressure-transition-period=5s",
            "--housekeeping-interval=1s",
            "--node-status-update-frequency=1s",
        ],
    )
    .await;
    let ns = TestNamespace::new("evict-soft").await;
    let pod = create_pod(
        &ns,
        &agent,
        "filler",
        serde_json::json!({
            "containers": [{"name": "ticker", "image": example_image("ticker"), "volumeMounts": [{"name": "scratch", "mountPath": "/scratch"}]}],
            "volumes": [{"name": "scratch", "emptyDir": {}}],
        }),
    )
    .await;
    ns.wait_pod(&agent, "filler", "the pod running", |p| {
        phase(p) == "Running"
    })
    .await;
    let uid = pod.metadata.uid.as_deref().expect("uid");
    let scratch = tmpfs
        .path
        .join("pods")
        .join(uid)
        .join("volumes/kubernetes.io~empty-dir/scratch");
    let fill = tmpfs.usage().1.saturating_sub(8 << 20);
    std::fs::write(scratch.join("filler"), vec![7u8; fill as usize]).expect("filling the emptyDir");

    // The condition comes at once; the pod stays for the 20 s grace period. This read proves
    // that something did NOT happen yet: the window is the whole 20 s soft grace period (status
    // updates every 1 s), so only a 20 s stall between the two reads could fail it falsely.
    wait_node(&agent, "DiskPressure True", |n| {
        node_condition(n, "DiskPressure").as_deref() == Some("True")
    })
    .await;
    let running = ns.pods().get("filler").await.expect("pod");
    assert_eq!(
        phase(&running),
        "Running",
        "a soft threshold waits out its grace period"
    );
    let evicted = ns
        .wait_pod(
            &agent,
            "filler",
            "the pod evicted after the grace period",
            |p| phase(p) == "Failed",
        )
        .await;
    assert_eq!(reason(&evicted), "Evicted");
    assert!(message(&evicted).starts_with("The node was low on resource: ephemeral-storage. Threshold quantity: 16Mi, available: "), "{}", message(&evicted));
    wait_node(&agent, "DiskPressure False again", |n| {
        node_condition(n, "DiskPressure").as_deref() == Some("False")
    })
    .await;
}
