//! Graceful node shutdown of container pods (issue #15): on a mixed node (containerd beside the
//! Wasm runtime) with `--shutdown-grace-period` and `--shutdown-grace-period-critical-pods`,
//! SIGTERM stops the busybox pods in the kubelet's order (regular ones, then critical ones,
//! each within its phase's budget; a container that ignores SIGTERM is killed when the budget
//! is spent), each ends Failed/Terminated with a DisruptionTarget condition, no container
//! process is left (every task of the node's containerd namespace STOPPED, its process gone),
//! the node is marked not ready, and a Wasm pod on the same node is stopped with the regular
//! ones as on a Wasm-only node (tests/shutdown.rs).

use std::sync::{Arc, Mutex};

use futures::{StreamExt, TryStreamExt};
use integration_tests::mixed_node::MixedNode;
use integration_tests::{
    all_containers_running as running, example_image, node_condition, stopped_for_shutdown,
    wait_for, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{watcher, WatchStreamExt};

/// The exit code of the pod's one container, once terminated.
fn exit_code(pod: &Pod) -> Option<i32> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

/// A busybox pod running `script` (as PID 1 of its container: a signal without a handler is
/// ignored, so each script says what it does with SIGTERM).
fn busybox(script: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut spec = serde_json::json!({
        "terminationGracePeriodSeconds": 30,
        "containers": [{"name": "main", "image": MixedNode::busybox(), "command": ["sh", "-c", script]}],
    });
    spec.as_object_mut()
        .expect("object")
        .extend(extra.as_object().expect("object").clone());
    spec
}

/// Stops at SIGTERM (exit 0); `sleep` in the background so the shell can take the signal.
const POLITE: &str = "trap 'exit 0' TERM; while true; do sleep 1 & wait $!; done";
/// Ignores SIGTERM: only the SIGKILL at the end of its grace stops it.
const STUBBORN: &str = "trap '' TERM; while true; do sleep 1; done";

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_container_pods_regular_then_critical_and_leaves_no_container_process() {
    // Regular pods get 12 - 6 = 6 s (their own 30 s capped), critical ones 6 s.
    let mut node = MixedNode::start(
        "mixed-shutdown",
        &[
            "--shutdown-grace-period=12s",
            "--shutdown-grace-period-critical-pods=6s",
        ],
    )
    .await;
    let ns = TestNamespace::new("mixed-shutdown").await;
    let agent = &node.agent;
    ns.create_bound_pod(
        agent,
        "regular",
        serde_json::json!({}),
        busybox(POLITE, serde_json::json!({})),
    )
    .await;
    ns.create_bound_pod(
        agent,
        "stubborn",
        serde_json::json!({}),
        busybox(STUBBORN, serde_json::json!({})),
    )
    .await;
    ns.create_bound_pod(
        agent,
        "critical",
        serde_json::json!({}),
        busybox(
            POLITE,
            serde_json::json!({"priorityClassName": "system-node-critical"}),
        ),
    )
    .await;
    ns.create_bound_pod(
        agent,
        "wasm",
        serde_json::json!({}),
        serde_json::json!({
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "main", "image": example_image("toolbox"), "command": ["sleep", "3600"]}],
        }),
    )
    .await;
    let all = ["regular", "stubborn", "critical", "wasm"];
    for name in all {
        ns.wait_pod(agent, name, "the pod to run", running).await;
    }
    let tasks = node.ctr(&["tasks", "list", "-q"]);
    assert!(
        tasks.lines().count() >= 3,
        "the three busybox pods' tasks: {tasks}"
    );

    // Every pod change in the namespace, in the API server's order, from now on.
    let changes: Arc<Mutex<Vec<(String, bool, bool)>>> = Arc::default();
    let record = changes.clone();
    let pods = ns.pods();
    let watching = tokio::spawn(async move {
        let mut stream = watcher(pods, watcher::Config::default())
            .applied_objects()
            .boxed();
        while let Ok(Some(pod)) = stream.try_next().await {
            let name = pod.metadata.name.clone().unwrap_or_default();
            record
                .lock()
                .expect("changes")
                .push((name, stopped_for_shutdown(&pod), running(&pod)));
        }
    });
    wait_for("the watch to list the pods", TEST_TIMEOUT, || async {
        (changes.lock().expect("changes").len() >= all.len()).then_some(())
    })
    .await
    .expect("watch");

    let status = tokio::task::block_in_place(|| node.agent.terminate(TEST_TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}\n{}", node.agent.log_tail()));
    assert!(
        status.success(),
        "the agent exits 0 after a graceful node shutdown: {status:?}\n{}",
        node.agent.log_tail()
    );

    for name in all {
        let pod = ns.pods().get(name).await.expect("pod");
        assert!(
            stopped_for_shutdown(&pod),
            "{name}: {:#?}\n{}",
            pod.status,
            node.agent.log_tail()
        );
        let disruption = pod
            .status
            .as_ref()
            .and_then(|s| s.conditions.as_ref())
            .and_then(|c| c.iter().find(|c| c.type_ == "DisruptionTarget"))
            .unwrap_or_else(|| panic!("{name}: a DisruptionTarget condition: {:#?}", pod.status));
        assert_eq!(
            (disruption.status.as_str(), disruption.reason.as_deref()),
            ("True", Some("TerminationByKubelet")),
            "{name}"
        );
    }
    // The polite containers stopped at SIGTERM; the stubborn one was killed at its budget's end.
    let pods = ns.pods();
    let code = |name: &'static str| {
        let pods = pods.clone();
        async move { exit_code(&pods.get(name).await.expect("pod")) }
    };
    assert_eq!(code("regular").await, Some(0), "regular exits at SIGTERM");
    assert_eq!(code("critical").await, Some(0), "critical exits at SIGTERM");
    assert_eq!(code("stubborn").await, Some(137), "stubborn is SIGKILLed");

    // The regular pods (container and Wasm) stopped before the critical one, which still ran
    // when each of them had stopped.
    watching.abort();
    let changes = changes.lock().expect("changes").clone();
    let stopped_at = |who: &str| {
        changes
            .iter()
            .position(|(name, stopped, _)| name == who && *stopped)
            .unwrap_or_else(|| panic!("the watch saw {who} stop: {changes:?}"))
    };
    let critical_stopped = stopped_at("critical");
    for regular in ["regular", "stubborn", "wasm"] {
        let at = stopped_at(regular);
        assert!(
            at < critical_stopped,
            "{regular} before critical: {changes:?}"
        );
        let critical_before = changes[..at]
            .iter()
            .rev()
            .find(|(name, _, _)| name == "critical")
            .expect("the critical pod seen before");
        assert!(
            critical_before.2,
            "the critical pod still ran when {regular} had stopped: {changes:?}"
        );
    }

    // No container process is left: every task still in the node's containerd namespace is
    // STOPPED and its process gone.
    let tasks = node.ctr(&["tasks", "list"]);
    for line in tasks.lines().skip(1) {
        let fields: Vec<&str> = line.split_whitespace().collect();
        assert_eq!(
            fields.get(2),
            Some(&"STOPPED"),
            "a task still runs: {tasks}"
        );
        let pid = fields.get(1).copied().unwrap_or("0");
        assert!(
            pid == "0" || !std::path::Path::new(&format!("/proc/{pid}")).exists(),
            "the process of a stopped task is still there: {tasks}"
        );
    }
    // The containerd shims of the node's namespace (one per task) that outlive the agent.
    let marker = format!("-namespace {}", node.leftovers.namespace);
    let shims = std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("containerd-shim") && c.contains(&marker))
        .count();
    eprintln!("tasks after the shutdown:\n{tasks}shims of the node's namespace left: {shims}");
    // The provider records each exit in the container record and deletes the task (as CRI
    // containerd does), so no shim outlives its container's exit.
    assert_eq!(
        shims, 0,
        "a containerd shim of the node's namespace outlives the shutdown: {tasks}"
    );

    let nodes: kube::Api<Node> = kube::Api::all(Cluster::get().admin().await);
    let api_node = nodes.get(&node.agent.name).await.expect("node");
    assert_eq!(node_condition(&api_node, "Ready").as_deref(), Some("False"));
    let ready = api_node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .expect("Ready");
    assert_eq!(
        (ready.reason.as_deref(), ready.message.as_deref()),
        (Some("KubeletNotReady"), Some("node is shutting down"))
    );
}
