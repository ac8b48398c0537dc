//! Wasm pods end to end: images from wasm-examples/ pushed to the local registry by
//! deploy/push-examples, pods created through the real API server and bound to a test node by
//! `spec.nodeName`, status read back from the API server. One namespace per test.

use std::time::Duration;

use integration_tests::{
    example_image, phase, test_node, wait_for, workspace_root, Agent, Cluster, TestNamespace,
    TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{ConfigMap, Pod, Secret};
use kube::api::{DeleteParams, PostParams};
use kube::Api;

async fn node() -> Agent {
    test_node("pods", &[]).await
}

type Ns = TestNamespace;

/// Pods with one or more containers, bound to the test's node.
trait CreatePods {
    async fn create_pod(
        &self,
        agent: &Agent,
        name: &str,
        restart: &str,
        containers: serde_json::Value,
        extra: serde_json::Value,
    ) -> Pod;
}

impl CreatePods for Ns {
    async fn create_pod(
        &self,
        agent: &Agent,
        name: &str,
        restart: &str,
        containers: serde_json::Value,
        extra: serde_json::Value,
    ) -> Pod {
        let mut spec = serde_json::json!({"restartPolicy": restart, "terminationGracePeriodSeconds": 2, "containers": containers});
        if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
            spec.extend(extra);
        }
        self.create_bound_pod(agent, name, serde_json::json!({}), spec)
            .await
    }
}

fn container_status(
    pod: &Pod,
    index: usize,
) -> Option<&k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.get(index)
}

fn terminated(pod: &Pod) -> Option<&k8s_openapi::api::core::v1::ContainerStateTerminated> {
    container_status(pod, 0)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
}

fn waiting_reason(pod: &Pod) -> Option<&str> {
    container_status(pod, 0)?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .as_deref()
}

/// The CRI log of a container's first run.
fn log_of(agent: &Agent, ns: &str, pod: &Pod, container: &str, attempt: u32) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap();
    let name = pod.metadata.name.as_deref().unwrap();
    let path = agent
        .dir
        .join("logs")
        .join(format!("{ns}_{name}_{uid}"))
        .join(container)
        .join(format!("{attempt}.log"));
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

#[tokio::test]
async fn hello_succeeds_with_its_output_in_the_log() {
    let agent = &node().await;
    let ns = Ns::new("hello").await;
    ns.create_pod(
        agent,
        "hello",
        "Never",
        serde_json::json!([{"name": "hello", "image": example_image("hello")}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "hello", "hello to succeed", |p| {
            phase(p) == "Succeeded"
        })
        .await;

    let t = terminated(&pod).expect("terminated state");
    assert_eq!((t.exit_code, t.reason.as_deref()), (0, Some("Completed")));
    let cs = container_status(&pod, 0).unwrap();
    assert!(
        cs.image_id.contains("@sha256:"),
        "imageID carries the digest: {}",
        cs.image_id
    );
    assert!(cs
        .container_id
        .as_deref()
        .is_some_and(|id| id.starts_with("wasm://")));
    let status = pod.status.as_ref().unwrap();
    assert_eq!(
        status.pod_ip.as_deref(),
        Some(agent.node_ip.as_str()),
        "the pod IP is the node IP"
    );
    assert_eq!(status.host_ip.as_deref(), Some(agent.node_ip.as_str()));
    assert!(status.start_time.is_some());
    assert_eq!(status.qos_class.as_deref(), Some("BestEffort"));

    let log = log_of(agent, &ns.name, &pod, "hello", 0);
    let line = log
        .lines()
        .find(|l| l.contains("Hello from WebAssembly!"))
        .unwrap_or_else(|| panic!("log: {log}"));
    let fields: Vec<&str> = line.splitn(4, ' ').collect();
    assert_eq!(&fields[1..3], ["stdout", "F"], "CRI log format: {line}");

    // Events are published after the status they describe may be visible: wait for them.
    let wanted = ["Pulling", "Pulled", "Created", "Started"];
    ns.wait_events(
        agent,
        "hello",
        "the Pulling, Pulled, Created and Started events",
        |events| wanted.iter().all(|w| events.iter().any(|(r, _)| r == w)),
    )
    .await;
}

#[tokio::test]
async fn exit_code_3_with_never_fails() {
    let agent = &node().await;
    let ns = Ns::new("exit3").await;
    ns.create_pod(
        agent,
        "exit",
        "Never",
        serde_json::json!([{"name": "exit", "image": example_image("exit-with"), "args": ["3"]}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "exit", "the pod to fail", |p| phase(p) == "Failed")
        .await;
    let t = terminated(&pod).unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (3, Some("Error")));
    assert_eq!(container_status(&pod, 0).unwrap().restart_count, 0);

    // FallbackToLogsOnError: the log's tail becomes the termination message.
    ns.create_pod(
        agent,
        "exit-logs",
        "Never",
        serde_json::json!([{"name": "exit", "image": example_image("exit-with"), "args": ["5"], "terminationMessagePolicy": "FallbackToLogsOnError"}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "exit-logs", "the second pod to fail", |p| {
            phase(p) == "Failed"
        })
        .await;
    let message = terminated(&pod)
        .unwrap()
        .message
        .clone()
        .unwrap_or_default();
    assert!(
        message.contains("exiting with status 5"),
        "termination message from the log: {message:?}"
    );
}

#[tokio::test]
async fn on_failure_restarts_with_backoff() {
    let agent = &node().await;
    let ns = Ns::new("crashloop").await;
    ns.create_pod(
        agent,
        "crash",
        "OnFailure",
        serde_json::json!([{"name": "crash", "image": example_image("crash-looper")}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "crash", "a restart and CrashLoopBackOff", |p| {
            container_status(p, 0).is_some_and(|c| c.restart_count >= 1)
                && waiting_reason(p) == Some("CrashLoopBackOff")
        })
        .await;
    assert_eq!(
        phase(&pod),
        "Running",
        "a pod that will restart stays Running"
    );
    let last = container_status(&pod, 0)
        .unwrap()
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .as_ref()
        .expect("lastState.terminated");
    assert_eq!(last.exit_code, 1);
    ns.wait_events(agent, "crash", "a BackOff event", |events| {
        events.iter().any(|(r, _)| r == "BackOff")
    })
    .await;
}

#[tokio::test]
async fn env_from_configmap_secret_and_downward_api() {
    let agent = &node().await;
    let ns = Ns::new("env").await;
    let cm: ConfigMap = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "cfg"}, "data": {"color": "blue", "size": "L"}}),
    )
    .unwrap();
    Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let secret: Secret = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "creds"}, "stringData": {"password": "s3cret"}}),
    )
    .unwrap();
    Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
    ns.create_pod(
        agent,
        "env",
        "Never",
        serde_json::json!([{
            "name": "env", "image": example_image("env-and-args"), "args": ["$(GREETING)-arg"],
            "envFrom": [{"configMapRef": {"name": "cfg"}, "prefix": "CFG_"}],
            "env": [
                {"name": "GREETING", "value": "hi"},
                {"name": "PASSWORD", "valueFrom": {"secretKeyRef": {"name": "creds", "key": "password"}}},
                {"name": "POD_NAME", "valueFrom": {"fieldRef": {"fieldPath": "metadata.name"}}},
                {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
            ],
        }]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "env", "the env printer to succeed", |p| {
            phase(p) == "Succeeded"
        })
        .await;
    let log = log_of(agent, &ns.name, &pod, "env", 0);
    for want in [
        "env CFG_color=blue",
        "env PASSWORD=s3cret",
        "env POD_NAME=env",
        &format!("env POD_IP={}", agent.node_ip),
        "=hi-arg",
    ] {
        assert!(log.contains(want), "{want:?} in log:\n{log}");
    }
}

#[tokio::test]
async fn a_missing_secret_is_create_container_config_error() {
    let agent = &node().await;
    let ns = Ns::new("nosecret").await;
    ns.create_pod(
        agent,
        "nosecret",
        "Never",
        serde_json::json!([{"name": "c", "image": example_image("hello"), "env": [{"name": "X", "valueFrom": {"secretKeyRef": {"name": "absent", "key": "k"}}}]}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "nosecret", "CreateContainerConfigError", |p| {
            waiting_reason(p) == Some("CreateContainerConfigError")
        })
        .await;
    let msg = container_status(&pod, 0)
        .unwrap()
        .state
        .as_ref()
        .unwrap()
        .waiting
        .as_ref()
        .unwrap()
        .message
        .clone()
        .unwrap_or_default();
    assert!(
        msg.contains("absent"),
        "the message names the secret: {msg}"
    );
    assert_eq!(phase(&pod), "Pending");
}

#[tokio::test]
async fn a_bad_image_is_image_pull_backoff_with_an_event() {
    let agent = &node().await;
    let ns = Ns::new("badimage").await;
    let bad = format!(
        "{}/wasm-examples/does-not-exist:v1",
        Cluster::get().var("REGISTRY")
    );
    ns.create_pod(
        agent,
        "bad",
        "Never",
        serde_json::json!([{"name": "c", "image": bad}]),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "bad", "ErrImagePull or ImagePullBackOff", |p| {
        matches!(waiting_reason(p), Some("ErrImagePull" | "ImagePullBackOff"))
    })
    .await;
    ns.wait_events(agent, "bad", "a Failed event", |events| {
        events.iter().any(|(r, _)| r == "Failed")
    })
    .await;
}

#[tokio::test]
async fn a_memory_hog_is_oom_killed() {
    let agent = &node().await;
    let ns = Ns::new("oom").await;
    ns.create_pod(
        agent,
        "hog",
        "Never",
        serde_json::json!([{"name": "hog", "image": example_image("memory-hog"), "resources": {"limits": {"memory": "32Mi"}}}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "hog", "the hog to be OOMKilled", |p| {
            phase(p) == "Failed"
        })
        .await;
    let t = terminated(&pod).unwrap();
    assert_eq!((t.exit_code, t.reason.as_deref()), (137, Some("OOMKilled")));
}

#[tokio::test]
async fn a_busy_loop_is_stopped_within_its_grace_period_on_delete() {
    let agent = &node().await;
    let ns = Ns::new("busy").await;
    ns.create_pod(
        agent,
        "busy",
        "Always",
        serde_json::json!([{"name": "busy", "image": example_image("busy-loop")}]),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "busy", "the busy loop to run", |p| {
        phase(p) == "Running"
    })
    .await;
    let started = std::time::Instant::now();
    ns.pods()
        .delete("busy", &DeleteParams::default())
        .await
        .unwrap();
    let pods = ns.pods();
    wait_for("the pod object to be removed", TEST_TIMEOUT, || async {
        pods.get_opt("busy").await.ok()?.is_none().then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    // Grace is 2 s; the node deletes the object once the instance has stopped. The bound is
    // under half the 30 s default grace (what a node that ignored the pod's would take) and
    // leaves 13 s for the API round trips on a loaded machine.
    assert!(
        started.elapsed() < Duration::from_secs(15),
        "took {:?}",
        started.elapsed()
    );
}

#[tokio::test]
async fn a_preview2_component_runs() {
    let agent = &node().await;
    let ns = Ns::new("component").await;
    ns.create_pod(
        agent,
        "comp",
        "Never",
        serde_json::json!([{"name": "comp", "image": example_image("hello-component")}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "comp", "the component to succeed", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    assert_eq!(phase(&pod), "Succeeded", "{:#?}", pod.status);
    assert!(
        log_of(agent, &ns.name, &pod, "comp", 0).contains("Hello from a WebAssembly component!")
    );
}

#[tokio::test]
async fn init_containers_run_first_and_a_failing_one_blocks_the_app() {
    let agent = &node().await;
    let ns = Ns::new("init").await;
    ns.create_pod(
        agent,
        "init-ok",
        "Never",
        serde_json::json!([{"name": "app", "image": example_image("hello")}]),
        serde_json::json!({"initContainers": [{"name": "first", "image": example_image("exit-with"), "args": ["0"]}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "init-ok", "init then app to succeed", |p| {
            phase(p) == "Succeeded"
        })
        .await;
    let init = &pod
        .status
        .as_ref()
        .unwrap()
        .init_container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(
        init.state
            .as_ref()
            .unwrap()
            .terminated
            .as_ref()
            .unwrap()
            .exit_code,
        0
    );

    ns.create_pod(
        agent,
        "init-fail",
        "Never",
        serde_json::json!([{"name": "app", "image": example_image("hello")}]),
        serde_json::json!({"initContainers": [{"name": "first", "image": example_image("exit-with"), "args": ["4"]}]}),
    )
    .await;
    let pod = ns
        .wait_pod(
            agent,
            "init-fail",
            "the pod to fail on its init container",
            |p| phase(p) == "Failed",
        )
        .await;
    let app = container_status(&pod, 0).unwrap();
    assert!(
        app.state.as_ref().unwrap().terminated.is_none() && app.restart_count == 0,
        "the app container never ran: {app:?}"
    );
}

#[tokio::test]
async fn a_corrupt_module_fails_with_a_clear_reason() {
    let agent = &node().await;
    let ns = Ns::new("corrupt").await;
    // A Wasm header followed by garbage: pushed like any module, refused by the compiler.
    let dir = workspace_root().join("target/it").join(&agent.name);
    std::fs::create_dir_all(&dir).unwrap();
    let file = dir.join("corrupt.wasm");
    let mut bytes = b"\0asm\x01\0\0\0".to_vec();
    bytes.extend((0u8..200).map(|i| i.wrapping_mul(37)));
    std::fs::write(&file, bytes).unwrap();
    let reference = format!(
        "{}/wasm-examples/corrupt:{}",
        Cluster::get().var("REGISTRY"),
        agent.name
    );
    let out = std::process::Command::new(workspace_root().join("deploy/push-wasm"))
        .arg(&file)
        .arg(&reference)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );

    ns.create_pod(
        agent,
        "corrupt",
        "Never",
        serde_json::json!([{"name": "c", "image": reference}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "corrupt", "CreateContainerError", |p| {
            waiting_reason(p) == Some("CreateContainerError")
        })
        .await;
    let msg = container_status(&pod, 0)
        .unwrap()
        .state
        .as_ref()
        .unwrap()
        .waiting
        .as_ref()
        .unwrap()
        .message
        .clone()
        .unwrap_or_default();
    assert!(!msg.is_empty(), "the reason carries the compiler's message");
    ns.wait_events(agent, "corrupt", "a Failed event", |events| {
        events.iter().any(|(r, _)| r == "Failed")
    })
    .await;
}

#[tokio::test]
async fn an_agent_restart_adopts_running_containers_without_a_restart() {
    let mut agent = node().await;
    let ns = Ns::new("restart").await;
    ns.create_pod(
        &agent,
        "done",
        "Never",
        serde_json::json!([{"name": "hello", "image": example_image("hello")}]),
        serde_json::json!({}),
    )
    .await;
    ns.create_pod(
        &agent,
        "tick",
        "Always",
        serde_json::json!([{"name": "tick", "image": example_image("ticker")}]),
        serde_json::json!({}),
    )
    .await;
    let done = ns
        .wait_pod(&agent, "done", "hello to succeed", |p| {
            phase(p) == "Succeeded"
        })
        .await;
    let before = ns
        .wait_pod(&agent, "tick", "the ticker to run", |p| {
            phase(p) == "Running" && container_status(p, 0).is_some_and(|c| c.ready)
        })
        .await;
    let runtime = agent
        .runtime_pid()
        .expect("the agent started a runtime process");

    agent.kill9();
    agent.spawn().unwrap();

    // The runtime process kept the ticker running: the new agent adopts the same instance
    // (same container ID, same start time, no restart). The pod's status already says so, so
    // what shows the new agent's decision is its log: adopted, not lost.
    wait_for(
        "the restarted agent to adopt the ticker",
        TEST_TIMEOUT,
        || async {
            let log = std::fs::read_to_string(agent.dir.join("agent.log")).ok()?;
            log.lines()
                .any(|l| {
                    l.contains("container adopted from the runtime") && l.contains("container=tick")
                })
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert!(
        agent
            .log()
            .contains("adopting the Wasm runtime that answers"),
        "{}",
        agent.log_tail()
    );
    assert!(
        !agent.log().contains("container not found in the runtime"),
        "{}",
        agent.log_tail()
    );
    // Two syncs later (a PLEG relist a second) the status still says the same instance runs.
    tokio::time::sleep(Duration::from_secs(2)).await;
    let tick = ns.pods().get("tick").await.unwrap();
    assert_eq!(
        agent.runtime_pid(),
        Some(runtime),
        "the same runtime process serves the restarted agent"
    );
    let (b, a) = (
        container_status(&before, 0).unwrap(),
        container_status(&tick, 0).unwrap(),
    );
    assert_eq!(a.container_id, b.container_id, "the same instance");
    assert_eq!(a.restart_count, 0);
    assert!(
        a.last_state
            .as_ref()
            .and_then(|s| s.terminated.as_ref())
            .is_none(),
        "no terminated state: {:?}",
        a.last_state
    );
    assert_eq!(
        a.state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone()),
        b.state
            .as_ref()
            .and_then(|s| s.running.as_ref())
            .and_then(|r| r.started_at.clone())
    );
    let done_after = ns.pods().get("done").await.unwrap();
    assert_eq!(phase(&done_after), "Succeeded");
    assert_eq!(container_status(&done_after, 0).unwrap().restart_count, 0);
    assert_eq!(pod_logs(&agent, &ns, &tick, "tick"), ["0.log"]);
    assert_eq!(pod_logs(&agent, &ns, &done, "hello"), ["0.log"]);
}

/// The log files of `container`'s runs, sorted.
fn pod_logs(agent: &Agent, ns: &Ns, pod: &Pod, container: &str) -> Vec<String> {
    let dir = agent
        .dir
        .join("logs")
        .join(format!(
            "{}_{}_{}",
            ns.name,
            pod.metadata.name.as_deref().unwrap(),
            pod.metadata.uid.as_deref().unwrap()
        ))
        .join(container);
    let mut names: Vec<String> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().file_name().to_string_lossy().into_owned())
        .collect();
    names.sort();
    names
}

#[tokio::test]
async fn containers_lost_with_an_in_agent_runtime_are_reported_and_restarted_once() {
    let mut agent = test_node("pods-in-agent", &["--wasm-runtime=in-agent"]).await;
    let ns = Ns::new("restart-in-agent").await;
    ns.create_pod(
        &agent,
        "done",
        "Never",
        serde_json::json!([{"name": "hello", "image": example_image("hello")}]),
        serde_json::json!({}),
    )
    .await;
    ns.create_pod(
        &agent,
        "tick",
        "Always",
        serde_json::json!([{"name": "tick", "image": example_image("ticker")}]),
        serde_json::json!({}),
    )
    .await;
    let done = ns
        .wait_pod(&agent, "done", "hello to succeed", |p| {
            phase(p) == "Succeeded"
        })
        .await;
    ns.wait_pod(&agent, "tick", "the ticker to run", |p| {
        phase(p) == "Running" && container_status(p, 0).is_some_and(|c| c.ready)
    })
    .await;
    assert_eq!(agent.runtime_pid(), None, "no runtime process in-agent");

    agent.kill9();
    agent.spawn().unwrap();

    // The ticker's instance died with the agent: it runs again, counted as a restart, and its
    // last state says why. The finished pod is left alone.
    let tick = ns
        .wait_pod(
            &agent,
            "tick",
            "the ticker to run again after the agent restart",
            |p| {
                let Some(c) = container_status(p, 0) else {
                    return false;
                };
                c.restart_count == 1 && c.state.as_ref().is_some_and(|s| s.running.is_some())
            },
        )
        .await;
    let last = container_status(&tick, 0)
        .unwrap()
        .last_state
        .as_ref()
        .unwrap()
        .terminated
        .clone()
        .unwrap();
    assert_eq!(last.reason.as_deref(), Some("ContainerStatusUnknown"));
    let done_after = ns.pods().get("done").await.unwrap();
    assert_eq!(phase(&done_after), "Succeeded");
    assert_eq!(container_status(&done_after, 0).unwrap().restart_count, 0);

    // One instance per run: the ticker has logs for runs 0 and 1 only, hello for run 0 only.
    assert_eq!(pod_logs(&agent, &ns, &tick, "tick"), ["0.log", "1.log"]);
    assert_eq!(pod_logs(&agent, &ns, &done, "hello"), ["0.log"]);
}

#[tokio::test]
async fn service_account_token_and_configmap_volumes_are_mounted() {
    let agent = &node().await;
    let ns = Ns::new("volumes").await;
    let cm: ConfigMap = serde_json::from_value(
        serde_json::json!({"metadata": {"name": "settings"}, "data": {"mode": "fast"}}),
    )
    .unwrap();
    Api::<ConfigMap>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &cm)
        .await
        .unwrap();
    let sa = "/var/run/secrets/kubernetes.io/serviceaccount";
    ns.create_pod(
        agent,
        "reader",
        "Never",
        serde_json::json!([{
            "name": "reader", "image": example_image("file-reader"),
            "args": [format!("{sa}/namespace"), format!("{sa}/ca.crt"), format!("{sa}/token"), "/config/mode"],
            "volumeMounts": [{"name": "cfg", "mountPath": "/config"}],
        }]),
        serde_json::json!({"volumes": [{"name": "cfg", "configMap": {"name": "settings"}}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "reader", "the reader to finish", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    let log = log_of(agent, &ns.name, &pod, "reader", 0);
    assert_eq!(phase(&pod), "Succeeded", "log:\n{log}");
    assert!(log.contains(&ns.name), "namespace file: {log}");
    assert!(log.contains("BEGIN CERTIFICATE"), "ca.crt: {log}");
    assert!(log.contains("eyJ"), "a JWT token: {log}");
    assert!(log.contains("fast"), "configMap key: {log}");
}

#[tokio::test]
async fn a_missing_configmap_volume_waits_with_failed_mount() {
    let agent = &node().await;
    let ns = Ns::new("nocm").await;
    ns.create_pod(
        agent,
        "nocm",
        "Never",
        serde_json::json!([{"name": "c", "image": example_image("hello"), "volumeMounts": [{"name": "cfg", "mountPath": "/config"}]}]),
        serde_json::json!({"volumes": [{"name": "cfg", "configMap": {"name": "absent"}}]}),
    )
    .await;
    ns.wait_events(agent, "nocm", "a FailedMount event", |events| {
        events.iter().any(|(r, _)| r == "FailedMount")
    })
    .await;
    // The event and the pod status come from different writers (the volume manager's event
    // queue, the status manager): the status is waited for, not expected with the event.
    ns.wait_pod(agent, "nocm", "the pod Pending in ContainerCreating", |p| {
        phase(p) == "Pending" && waiting_reason(p) == Some("ContainerCreating")
    })
    .await;
}

#[tokio::test]
async fn a_changed_image_restarts_the_container() {
    let agent = &node().await;
    let ns = Ns::new("newimage").await;
    ns.create_pod(
        agent,
        "tick",
        "Always",
        serde_json::json!([{"name": "tick", "image": example_image("ticker")}]),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "tick", "the ticker to run", |p| {
            container_status(p, 0).is_some_and(|c| c.ready)
        })
        .await;
    // The same module, named by digest: a new image reference in the spec.
    let digest = container_status(&pod, 0)
        .unwrap()
        .image_id
        .split('@')
        .nth(1)
        .unwrap()
        .to_string();
    let by_digest = format!(
        "{}/wasm-examples/ticker@{digest}",
        Cluster::get().var("REGISTRY")
    );
    let patch = serde_json::json!({"spec": {"containers": [{"name": "tick", "image": by_digest}]}});
    ns.pods()
        .patch(
            "tick",
            &kube::api::PatchParams::default(),
            &kube::api::Patch::Strategic(&patch),
        )
        .await
        .unwrap();
    let pod = ns
        .wait_pod(
            agent,
            "tick",
            "the container to restart with the new image",
            |p| {
                container_status(p, 0)
                    .is_some_and(|c| c.restart_count == 1 && c.ready && c.image == by_digest)
            },
        )
        .await;
    assert_eq!(phase(&pod), "Running");
}

#[tokio::test]
async fn active_deadline_fails_the_pod() {
    let agent = &node().await;
    let ns = Ns::new("deadline").await;
    ns.create_pod(
        agent,
        "late",
        "Always",
        serde_json::json!([{"name": "tick", "image": example_image("ticker")}]),
        serde_json::json!({"activeDeadlineSeconds": 2}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "late", "the pod to fail on its deadline", |p| {
            phase(p) == "Failed"
        })
        .await;
    assert_eq!(
        pod.status.as_ref().unwrap().reason.as_deref(),
        Some("DeadlineExceeded")
    );
}

#[tokio::test]
async fn a_forced_delete_stops_the_instance() {
    let agent = &node().await;
    let ns = Ns::new("force").await;
    ns.create_pod(
        agent,
        "spin",
        "Always",
        serde_json::json!([{"name": "spin", "image": example_image("busy-loop")}]),
        serde_json::json!({"terminationGracePeriodSeconds": 30}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "spin", "the busy loop to run", |p| {
            phase(p) == "Running"
        })
        .await;
    let out = Cluster::get()
        .kubectl()
        .args([
            "delete",
            "pod",
            "spin",
            "-n",
            &ns.name,
            "--grace-period=0",
            "--force",
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    // The object is gone at once; the instance must stop too: its log stops growing and the
    // agent logs the pod's termination.
    let uid = pod.metadata.uid.clone().unwrap();
    wait_for(
        "the agent to terminate the force-deleted pod",
        TEST_TIMEOUT,
        || async {
            agent
                .log()
                .lines()
                .any(|l| l.contains(&uid) && l.contains("terminating pod"))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}
