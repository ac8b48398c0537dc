//! An exited CONTAINER keeps no containerd shim: the containerd provider records the exit (code,
//! finish time, OOM mark) in the container record and deletes the task, as CRI containerd
//! does, so a Completed/Failed Job pod that stays in the API holds no `containerd-shim-runc-v2`
//! process. Through the real API server and kubectl, on a mixed node of each test's own:
//! - a Job-like pod (restartPolicy Never) that prints a line and exits 3 ends Failed with exit 3,
//!   its last line in `kubectl logs` once its task is gone (the shim's log driver drained it
//!   before the task's deletion returned), and no shim is left while the pod exists; after the
//!   agent is SIGKILLed and started again its status is unchanged (exit 3, the same finish
//!   time) and it does not run again; a container that exits while no agent runs is recorded
//!   and its task deleted by the next agent;
//! - a restartPolicy Always container exiting 0 twice: restartCount 2, `kubectl logs
//!   --previous` is the previous run's line, and once the third run is up only its shim is left
//!   (a shim of an earlier run would live on beside it). (Not asserted per sample: a deleted
//!   task's shim exits asynchronously, so for a few milliseconds the old shim may still be
//!   exiting when the next run's shim starts.)
//!
//! Network safety: no traffic but the test's to the API server and the local registry.

use integration_tests::mixed_node::MixedNode;
use integration_tests::{phase, wait_for, Cluster, TestNamespace, TEST_TIMEOUT};
use k8s_openapi::api::core::v1::{ContainerStateTerminated, ContainerStatus, Pod};

fn status(pod: &Pod) -> Option<ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == "c")
        .cloned()
}

fn terminated(pod: &Pod) -> Option<ContainerStateTerminated> {
    status(pod)?.state?.terminated
}

fn running(pod: &Pod) -> bool {
    status(pod).is_some_and(|c| c.state.is_some_and(|s| s.running.is_some()))
}

/// The containerd container ID of the pod's container (`containerd://<id>`).
fn container_id(pod: &Pod) -> String {
    let uri = status(pod).and_then(|c| c.container_id).unwrap_or_default();
    uri.strip_prefix("containerd://")
        .unwrap_or_else(|| panic!("not a containerd container ID: {uri:?}"))
        .to_string()
}

/// A pod of one busybox container `c` running `script` with `sh -c`, `spec` merged over the
/// pod spec.
fn busybox_pod(script: &str, spec: serde_json::Value) -> serde_json::Value {
    let mut full = serde_json::json!({"containers": [{
        "name": "c",
        "image": MixedNode::busybox(),
        "command": ["sh", "-c", script],
        "volumeMounts": [{"name": "state", "mountPath": "/state"}],
    }], "volumes": [{"name": "state", "emptyDir": {}}]});
    if let (Some(f), serde_json::Value::Object(spec)) = (full.as_object_mut(), spec) {
        f.extend(spec);
    }
    full
}

/// `kubectl logs <pod> [extra]` in the namespace: (success, stdout, stderr).
fn kubectl_logs(ns: &TestNamespace, pod: &str, extra: &[&str]) -> (bool, String, String) {
    let out = Cluster::get()
        .kubectl()
        .args(["logs", "-n", &ns.name, pod])
        .args(extra)
        .output()
        .expect("kubectl logs");
    (
        out.status.success(),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// The command lines of the containerd shims serving containerd namespace `namespace`.
fn shims(namespace: &str) -> Vec<String> {
    let marker = format!("-namespace {namespace} ");
    std::fs::read_dir("/proc")
        .expect("/proc")
        .filter_map(|e| std::fs::read(e.ok()?.path().join("cmdline")).ok())
        .map(|c| String::from_utf8_lossy(&c).replace('\0', " "))
        .filter(|c| c.contains("containerd-shim") && c.contains(&marker))
        .collect()
}

#[tokio::test]
async fn a_failed_job_pod_keeps_its_exit_and_last_line_but_no_shim_across_an_agent_kill() {
    let mut node = MixedNode::start("exited-job", &[]).await;
    let ns = TestNamespace::new("exited-job").await;
    let namespace = node.leftovers.namespace.clone();
    // Prints and exits at once: the line is still in the pipe when the process is gone.
    ns.create_bound_pod(
        &node.agent,
        "job",
        serde_json::json!({}),
        busybox_pod(
            "echo last line of the job; exit 3",
            serde_json::json!({"restartPolicy": "Never"}),
        ),
    )
    .await;
    let failed = ns
        .wait_pod(&node.agent, "job", "the job to fail", |p| {
            phase(p) == "Failed" && terminated(p).is_some()
        })
        .await;
    let id = container_id(&failed);
    let ended = terminated(&failed).unwrap();
    assert_eq!(
        (ended.exit_code, ended.reason.as_deref()),
        (3, Some("Error")),
        "{ended:?}"
    );
    let finished_at = ended.finished_at.clone().expect("a finish time");
    assert_eq!(status(&failed).unwrap().restart_count, 0);

    // The pod stays in the API; its container stays in containerd (the record of its exit),
    // its task and shim do not.
    wait_for("the job's task and shim to go", TEST_TIMEOUT, || async {
        (node.ctr(&["tasks", "list", "-q"]).trim().is_empty() && shims(&namespace).is_empty())
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: tasks {:?}, shims {:?}\n{}",
            node.ctr(&["tasks", "list"]),
            shims(&namespace),
            node.agent.log_tail()
        )
    });
    assert_eq!(
        node.ctr(&["containers", "list", "-q"]).trim(),
        id,
        "the exited container's record stays"
    );
    // Its last line was written before its task was deleted.
    let (ok, logs, err) = kubectl_logs(&ns, "job", &[]);
    assert!(ok, "kubectl logs: {err}");
    assert_eq!(logs, "last line of the job\n", "{err}");

    // A second container, made to exit while no agent runs (SIGUSR1).
    ns.create_bound_pod(
        &node.agent,
        "sleeper",
        serde_json::json!({}),
        busybox_pod(
            "trap 'echo bye; exit 5' USR1; while :; do sleep 1; done",
            serde_json::json!({"restartPolicy": "Never"}),
        ),
    )
    .await;
    let sleeping = ns
        .wait_pod(&node.agent, "sleeper", "the sleeper to run", running)
        .await;
    let sleeper_id = container_id(&sleeping);
    assert_eq!(shims(&namespace).len(), 1, "the running sleeper's shim");

    node.agent.kill9();
    node.ctr(&["tasks", "kill", "-s", "SIGUSR1", &sleeper_id]);
    wait_for("the sleeper to exit", TEST_TIMEOUT, || async {
        node.ctr(&["tasks", "list"])
            .lines()
            .any(|l| l.starts_with(&sleeper_id) && l.contains("STOPPED"))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.ctr(&["tasks", "list"])));
    node.agent.spawn().unwrap();
    let agent = &node.agent;

    // The new agent reports the sleeper's exit (so it has listed the containers) ...
    let sleeper = ns
        .wait_pod(agent, "sleeper", "the sleeper's exit reported", |p| {
            phase(p) == "Failed" && terminated(p).is_some()
        })
        .await;
    assert_eq!(terminated(&sleeper).unwrap().exit_code, 5);
    // ... recorded it and deleted its task: no task, no shim of the node's namespace.
    wait_for(
        "the sleeper's task and shim to go",
        TEST_TIMEOUT,
        || async {
            (node.ctr(&["tasks", "list", "-q"]).trim().is_empty() && shims(&namespace).is_empty())
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}: tasks {:?}, shims {:?}\n{}",
            node.ctr(&["tasks", "list"]),
            shims(&namespace),
            agent.log_tail()
        )
    });
    let (ok, logs, err) = kubectl_logs(&ns, "sleeper", &[]);
    assert!(ok && logs.ends_with("bye\n"), "{logs}{err}");

    // The job's status is as it was: exit 3, the same finish time, the same container, not run
    // again.
    let job = ns.pods().get("job").await.unwrap();
    assert_eq!(phase(&job), "Failed");
    let after = terminated(&job).unwrap();
    assert_eq!(
        (after.exit_code, after.finished_at.as_ref()),
        (3, Some(&finished_at)),
        "{after:?}"
    );
    // The same container, in the state and in the status's own `containerID`.
    let c = status(&job).unwrap();
    let uri = format!("containerd://{id}");
    assert_eq!(
        (
            after.container_id.as_deref(),
            c.container_id.as_deref(),
            c.restart_count
        ),
        (Some(uri.as_str()), Some(uri.as_str()), 0),
        "{:#?}",
        job.status
    );
    let mut records: Vec<String> = node
        .ctr(&["containers", "list", "-q"])
        .lines()
        .map(str::to_string)
        .collect();
    records.sort();
    let mut want = vec![id.clone(), sleeper_id.clone()];
    want.sort();
    assert_eq!(records, want, "no container was made again");
    let (ok, logs, err) = kubectl_logs(&ns, "job", &[]);
    assert!(ok, "{err}");
    assert_eq!(logs, "last line of the job\n", "one run only");
}

#[tokio::test]
async fn a_container_restarted_twice_keeps_one_shim_and_its_previous_log() {
    let node = MixedNode::start("exited-always", &[]).await;
    let ns = TestNamespace::new("exited-always").await;
    let namespace = node.leftovers.namespace.clone();

    // Runs 1 and 2 print their number and exit 0; run 3 prints and stays.
    ns.create_bound_pod(
        &node.agent,
        "again",
        serde_json::json!({}),
        busybox_pod(
            "n=$(cat /state/n 2>/dev/null || echo 0); n=$((n+1)); echo $n > /state/n; \
             echo run $n; if [ $n -ge 3 ]; then exec sleep 3600; fi; exit 0",
            serde_json::json!({"restartPolicy": "Always"}),
        ),
    )
    .await;
    let pod = ns
        .wait_pod(&node.agent, "again", "the third run", |p| {
            running(p) && status(p).is_some_and(|c| c.restart_count >= 2)
        })
        .await;
    let c = status(&pod).unwrap();
    assert_eq!(c.restart_count, 2, "{c:?}");
    let last = c
        .last_state
        .and_then(|s| s.terminated)
        .expect("a last state");
    assert_eq!(
        (last.exit_code, last.reason.as_deref()),
        (0, Some("Completed"))
    );
    wait_for("run 3's line", TEST_TIMEOUT, || async {
        let (_, logs, _) = kubectl_logs(&ns, "again", &[]);
        (logs == "run 3\n").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}: {:?}", kubectl_logs(&ns, "again", &[])));
    let (ok, previous, err) = kubectl_logs(&ns, "again", &["--previous"]);
    assert!(ok, "kubectl logs --previous: {err}");
    assert_eq!(previous, "run 2\n", "{err}");

    // Runs 1 and 2 exited seconds ago: their shims are gone, the running one's is left.
    let now = shims(&namespace);
    assert_eq!(
        now.len(),
        1,
        "the running container's shim only: {now:?}\n{}",
        node.ctr(&["tasks", "list"])
    );
}
