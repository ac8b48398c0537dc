//! Graceful node shutdown (`--shutdown-grace-period`, `--shutdown-grace-period-critical-pods`):
//! on SIGTERM the node goes not ready, regular pods stop first, critical pods after, each ends
//! Failed/Terminated with the kubelet's message and a DisruptionTarget condition, and only then
//! does the agent exit. Without the setting, SIGTERM leaves the pods running (tests/outlive.rs).

use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::{StreamExt, TryStreamExt};
use integration_tests::{
    all_containers_running as running, example_image, node_condition, phase, stopped_for_shutdown,
    test_node, wait_for, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::runtime::{watcher, WatchStreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// An HTTP endpoint for preStop hooks: records each request's path in arrival order and holds
/// the answer to `/slow` for `slow`, so the pod that calls it takes that long to stop.
async fn hook_listener(ip: &str, slow: Duration, seen: &Arc<Mutex<Vec<String>>>) -> u16 {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let record = seen.clone();
    tokio::spawn(async move {
        while let Ok((mut conn, _)) = listener.accept().await {
            let record = record.clone();
            tokio::spawn(async move {
                let mut buf = vec![0u8; 4096];
                let n = conn.read(&mut buf).await.unwrap_or(0);
                let line = String::from_utf8_lossy(&buf[..n]);
                let path = line.split(' ').nth(1).unwrap_or_default().to_string();
                record.lock().unwrap().push(path.clone());
                if path == "/slow" {
                    tokio::time::sleep(slow).await;
                }
                let _ = conn
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
            });
        }
    });
    port
}

fn condition<'a>(pod: &'a Pod, kind: &str) -> Option<&'a k8s_openapi::api::core::v1::PodCondition> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn sigterm_stops_regular_pods_then_critical_ones_and_marks_the_node_not_ready() {
    let mut agent = test_node(
        "shutdown",
        &[
            "--shutdown-grace-period=20s",
            "--shutdown-grace-period-critical-pods=10s",
        ],
    )
    .await;
    let ns = TestNamespace::new("shutdown").await;
    // The regular pod's preStop hook takes 3 s (its own grace, 30 s, is capped to the regular
    // phase's 10 s); the critical pod's hook answers at once.
    // One endpoint per pod (a pod's declared port is its own on the node).
    let hooks: Arc<Mutex<Vec<String>>> = Arc::default();
    let slow = Duration::from_secs(3);
    let ports = [
        hook_listener(&agent.node_ip, slow, &hooks).await,
        hook_listener(&agent.node_ip, slow, &hooks).await,
    ];
    let pod_spec = |port: u16, path: &str, extra: serde_json::Value| {
        let mut spec = serde_json::json!({
            "terminationGracePeriodSeconds": 30,
            "containers": [{
                "name": "main",
                "image": example_image("toolbox"),
                "command": ["sleep", "3600"],
                "ports": [{"containerPort": port}],
                "lifecycle": {"preStop": {"httpGet": {"port": port, "path": path}}},
            }],
        });
        spec.as_object_mut()
            .unwrap()
            .extend(extra.as_object().unwrap().clone());
        spec
    };
    ns.create_bound_pod(
        &agent,
        "regular",
        serde_json::json!({}),
        pod_spec(ports[0], "/slow", serde_json::json!({})),
    )
    .await;
    ns.create_bound_pod(
        &agent,
        "critical",
        serde_json::json!({}),
        pod_spec(
            ports[1],
            "/critical",
            serde_json::json!({"priorityClassName": "system-node-critical"}),
        ),
    )
    .await;
    for name in ["regular", "critical"] {
        ns.wait_pod(&agent, name, "the pod to run", running).await;
    }

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
                .unwrap()
                .push((name, stopped_for_shutdown(&pod), running(&pod)));
        }
    });

    wait_for("the watch to list both pods", TEST_TIMEOUT, || async {
        (changes.lock().unwrap().len() >= 2).then_some(())
    })
    .await
    .unwrap();

    // A pod bound while the node shuts down is refused, as the kubelet's shutdown manager
    // refuses it: it never runs.
    let late = {
        let (pods, node_name) = (ns.pods(), agent.name.clone());
        let late_spec = serde_json::json!({
            "containers": [{
                "name": "main",
                "image": example_image("toolbox"),
                "command": ["sleep", "3600"],
            }],
        });
        tokio::spawn(async move {
            let nodes: kube::Api<Node> = kube::Api::all(Cluster::get().admin().await);
            wait_for("the node to say it shuts down", TEST_TIMEOUT, || async {
                let node = nodes.get(&node_name).await.ok()?;
                (node_condition(&node, "Ready").as_deref() == Some("False")).then_some(())
            })
            .await
            .unwrap();
            let mut spec = late_spec;
            spec["nodeName"] = node_name.into();
            spec["restartPolicy"] = "Never".into();
            let pod: Pod = serde_json::from_value(
                serde_json::json!({"metadata": {"name": "late"}, "spec": spec}),
            )
            .unwrap();
            pods.create(&Default::default(), &pod).await.unwrap();
        })
    };

    let agent_log = agent.dir.join("agent.log");
    // The hook endpoints and the watch keep running on the other worker meanwhile.
    let status = tokio::task::block_in_place(|| agent.terminate(TEST_TIMEOUT))
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert!(
        status.success(),
        "the agent exits 0 after a graceful node shutdown: {status:?}\n{}",
        agent.log_tail()
    );

    late.await.unwrap();
    let pod = ns.pods().get("late").await.unwrap();
    let status = pod.status.clone().unwrap_or_default();
    assert_eq!(
        (
            phase(&pod),
            status.reason.as_deref(),
            status.message.as_deref()
        ),
        (
            "Failed",
            Some("NodeShutdown"),
            Some("Pod was rejected as the node is shutting down.")
        ),
        "{status:#?}"
    );
    assert!(
        status
            .container_statuses
            .iter()
            .flatten()
            .all(|c| c.container_id.is_none() && c.restart_count == 0),
        "the late pod never ran: {status:#?}"
    );

    // Both pods ended as the kubelet ends them, with their statuses written before the exit.
    for name in ["regular", "critical"] {
        let pod = ns.pods().get(name).await.unwrap();
        assert!(
            stopped_for_shutdown(&pod),
            "{name}: {:#?}\n{}",
            pod.status,
            std::fs::read_to_string(&agent_log).unwrap_or_default()
        );
        let disruption = condition(&pod, "DisruptionTarget").expect("a DisruptionTarget condition");
        assert_eq!(
            (disruption.status.as_str(), disruption.reason.as_deref()),
            ("True", Some("TerminationByKubelet"))
        );
    }
    // The regular pod stopped first: its preStop hook ran first, and when its Failed status
    // appeared the critical pod still ran.
    let seen = hooks.lock().unwrap().clone();
    assert_eq!(seen, ["/slow", "/critical"], "preStop hooks in order");
    watching.abort();
    let changes = changes.lock().unwrap().clone();
    let regular_stopped = changes
        .iter()
        .position(|(name, stopped, _)| name == "regular" && *stopped)
        .unwrap_or_else(|| panic!("the watch saw the regular pod stop: {changes:?}"));
    let critical_stopped = changes
        .iter()
        .position(|(name, stopped, _)| name == "critical" && *stopped)
        .unwrap_or_else(|| panic!("the watch saw the critical pod stop: {changes:?}"));
    assert!(regular_stopped < critical_stopped, "{changes:?}");
    let critical_before = changes[..regular_stopped]
        .iter()
        .rev()
        .find(|(name, _, _)| name == "critical")
        .expect("the critical pod seen before");
    assert!(
        critical_before.2,
        "the critical pod still ran when the regular one had stopped: {changes:?}"
    );

    // The node said why it is not ready.
    let nodes: kube::Api<Node> = kube::Api::all(Cluster::get().admin().await);
    let node = nodes.get(&agent.name).await.unwrap();
    assert_eq!(node_condition(&node, "Ready").as_deref(), Some("False"));
    let ready = node
        .status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .and_then(|c| c.iter().find(|c| c.type_ == "Ready"))
        .unwrap();
    assert_eq!(
        (ready.reason.as_deref(), ready.message.as_deref()),
        (Some("KubeletNotReady"), Some("node is shutting down"))
    );
}

#[tokio::test]
async fn a_bad_shutdown_grace_is_one_line_and_exit_2() {
    let out = std::process::Command::new(integration_tests::agent_binary())
        .args([
            "--hostname-override=bad-shutdown",
            "--shutdown-grace-period=10s",
            "--shutdown-grace-period-critical-pods=20s",
        ])
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("--shutdown-grace-period-critical-pods"),
        "{stderr}"
    );
}
