//! Pods outlive the agent: the guests run in the Wasm runtime process (`wasm-kubelet runtime`,
//! started by the agent), so killing or stopping the agent disturbs no pod, and a new agent
//! adopts what runs. When the runtime itself dies its containers are lost: the node says so
//! and the pods restart per policy. The runtime sits in a memory cgroup of its own.

use std::process::Stdio;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{
    example_image, phase, runtime_cgroup, test_node, wait_for, Agent, Cluster, TestNamespace,
    TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{ContainerStatus, Node, Pod};
use kube::Api;
use tokio::io::{AsyncBufReadExt, AsyncReadExt, AsyncWriteExt};

fn status(pod: &Pod, name: &str) -> ContainerStatus {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|cs| cs.iter().find(|c| c.name == name))
        .cloned()
        .unwrap_or_else(|| panic!("no status for {name}: {:?}", pod.status))
}

fn running(c: &ContainerStatus) -> bool {
    c.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// A port free on `ip` for the HTTP pod to declare.
fn free_port(ip: &str) -> u16 {
    std::net::TcpListener::bind((ip, 0))
        .expect("a free port")
        .local_addr()
        .unwrap()
        .port()
}

/// One `GET /` on a fresh connection: true when the component answered 200.
async fn get_ok(host: &str, port: u16) -> bool {
    let answer = async {
        let mut stream = tokio::net::TcpStream::connect((host, port)).await?;
        stream
            .write_all(
                format!("GET / HTTP/1.1\r\nHost: {host}:{port}\r\nConnection: close\r\n\r\n")
                    .as_bytes(),
            )
            .await?;
        let mut response = Vec::new();
        stream.read_to_end(&mut response).await?;
        std::io::Result::Ok(response.starts_with(b"HTTP/1.1 200"))
    };
    matches!(
        tokio::time::timeout(Duration::from_secs(10), answer).await,
        Ok(Ok(true))
    )
}

/// Waits until the agent's log shows a new agent run adopted `container` (its `n`th adoption).
async fn wait_adopted(agent: &Agent, container: &str, n: usize) {
    wait_for(
        &format!("adoption #{n} of {container}"),
        TEST_TIMEOUT,
        || async {
            let log = std::fs::read_to_string(agent.dir.join("agent.log")).ok()?;
            (log.lines()
                .filter(|l| {
                    l.contains("container adopted from the runtime")
                        && l.contains(&format!("container={container} "))
                })
                .count()
                >= n)
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}

/// The ticker's `tick N` lines in its log file, in order.
fn ticks(agent: &Agent, ns: &TestNamespace, pod: &Pod) -> Vec<u64> {
    let file = agent
        .dir
        .join("logs")
        .join(format!(
            "{}_{}_{}",
            ns.name,
            pod.metadata.name.as_deref().unwrap(),
            pod.metadata.uid.as_deref().unwrap()
        ))
        .join("tick/0.log");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .filter_map(|l| {
            l.rsplit_once("tick ")
                .and_then(|(_, n)| n.trim().parse().ok())
        })
        .collect()
}

/// Reads lines of `kubectl <args>` until one contains `want`; kills it then.
async fn kubectl_until(args: &[&str], want: &str) -> Result<String, String> {
    let mut child = tokio::process::Command::from(Cluster::get().kubectl())
        .args(args)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .kill_on_drop(true)
        .spawn()
        .map_err(|e| e.to_string())?;
    let mut lines = tokio::io::BufReader::new(child.stdout.take().unwrap()).lines();
    let found = tokio::time::timeout(TEST_TIMEOUT, async {
        while let Ok(Some(line)) = lines.next_line().await {
            if line.contains(want) {
                return Some(line);
            }
        }
        None
    })
    .await;
    let _ = child.kill().await;
    match found {
        Ok(Some(line)) => Ok(line),
        _ => {
            let mut err = String::new();
            if let Some(mut e) = child.stderr.take() {
                let _ = e.read_to_string(&mut err).await;
            }
            Err(format!(
                "kubectl {args:?} printed no line with {want:?}; stderr: {err}"
            ))
        }
    }
}

#[tokio::test]
async fn killing_and_stopping_the_agent_disturbs_no_running_pod() {
    let mut agent = test_node("outlive", &[]).await;
    let ns = TestNamespace::new("outlive").await;
    let port = free_port(&agent.node_ip);
    ns.create_bound_pod(&agent, "ticker", serde_json::json!({}), serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "tick", "image": example_image("ticker"), "stdin": true}]})).await;
    ns.create_bound_pod(
        &agent,
        "web",
        serde_json::json!({}),
        serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "web", "image": example_image("http-health"), "ports": [{"containerPort": port}]}]}),
    )
    .await;
    ns.create_bound_pod(&agent, "crashy", serde_json::json!({}), serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "crash", "image": example_image("crash-looper")}]})).await;
    let ticker = ns
        .wait_pod(&agent, "ticker", "the ticker to run", |p| {
            phase(p) == "Running"
        })
        .await;
    let web = ns
        .wait_pod(&agent, "web", "the component to serve", |p| {
            phase(p) == "Running" && status(p, "web").ready
        })
        .await;
    ns.wait_pod(
        &agent,
        "crashy",
        "the crash loop to have restarted once",
        |p| status(p, "crash").restart_count >= 1,
    )
    .await;
    let runtime = agent.runtime_pid().expect("a runtime process");

    // Requests all along, one after the other, counted.
    let (ok, failed) = (Arc::new(AtomicU64::new(0)), Arc::new(AtomicU64::new(0)));
    let load = {
        let (ok, failed, ip) = (ok.clone(), failed.clone(), agent.node_ip.clone());
        tokio::spawn(async move {
            loop {
                let counter = if get_ok(&ip, port).await {
                    &ok
                } else {
                    &failed
                };
                counter.fetch_add(1, Ordering::Relaxed);
            }
        })
    };
    // A pod mid-exec: a second ticker run inside the ticker pod, streaming through the agent.
    let mut exec = tokio::process::Command::from(Cluster::get().kubectl())
        .args(["exec", "-n", &ns.name, "ticker", "--", "ticker"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .unwrap();
    let mut exec_out = tokio::io::BufReader::new(exec.stdout.take().unwrap()).lines();
    let first = tokio::time::timeout(TEST_TIMEOUT, exec_out.next_line())
        .await
        .expect("exec output")
        .unwrap()
        .unwrap_or_default();
    assert!(first.contains("tick 1"), "the exec runs: {first:?}");
    let crash_before = status(&ns.pods().get("crashy").await.unwrap(), "crash").restart_count;

    agent.kill9();
    agent.spawn().unwrap();
    wait_adopted(&agent, "tick", 1).await;
    wait_adopted(&agent, "web", 1).await;
    let status_code = agent
        .terminate(TEST_TIMEOUT)
        .expect("the agent stops on SIGTERM");
    assert!(
        status_code.success(),
        "SIGTERM is a clean exit: {status_code}"
    );
    agent.spawn().unwrap();
    wait_adopted(&agent, "tick", 2).await;
    wait_adopted(&agent, "web", 2).await;
    let _ = exec.kill().await;

    // A few more requests after both restarts, then the count.
    let seen = ok.load(Ordering::Relaxed);
    wait_for(
        "requests answered after the restarts",
        TEST_TIMEOUT,
        || async { (ok.load(Ordering::Relaxed) >= seen + 20).then_some(()) },
    )
    .await
    .unwrap();
    load.abort();
    let (ok, failed) = (ok.load(Ordering::Relaxed), failed.load(Ordering::Relaxed));
    eprintln!("HTTP through two agent restarts: {ok} answered, {failed} failed");
    assert_eq!(
        failed, 0,
        "every request was answered while the agent was killed and stopped"
    );

    assert_eq!(
        agent.runtime_pid(),
        Some(runtime),
        "one runtime process throughout"
    );
    let (ticker_after, web_after) = (
        ns.pods().get("ticker").await.unwrap(),
        ns.pods().get("web").await.unwrap(),
    );
    for (before, after, name) in [(&ticker, &ticker_after, "tick"), (&web, &web_after, "web")] {
        let (b, a) = (status(before, name), status(after, name));
        assert_eq!(a.container_id, b.container_id, "{name}: the same instance");
        assert_eq!(a.restart_count, 0, "{name}: no restart");
        assert!(running(&a), "{name} runs: {:?}", a.state);
    }
    // The crash loop went on where it was: its count did not start over, and no run was
    // reported lost.
    let crashy = ns
        .wait_pod(&agent, "crashy", "the crash loop to go on", |p| {
            status(p, "crash").restart_count > crash_before
        })
        .await;
    let last = status(&crashy, "crash")
        .last_state
        .and_then(|s| s.terminated)
        .map(|t| t.reason.unwrap_or_default());
    assert_ne!(last.as_deref(), Some("ContainerStatusUnknown"));
    assert!(
        !agent.log().contains("container not found in the runtime"),
        "{}",
        agent.log_tail()
    );

    // No log line lost: the ticker's lines run 1, 2, 3, ... without a gap, one file.
    let lines = ticks(&agent, &ns, &ticker_after);
    assert!(lines.len() >= 3, "{lines:?}");
    assert!(
        lines.iter().zip(1u64..).all(|(n, want)| *n == want),
        "tick lines are consecutive from 1: {lines:?}"
    );

    // kubectl logs -f and attach work through the new agent.
    let next = lines.last().unwrap() + 2;
    kubectl_until(
        &["logs", "-f", "-n", &ns.name, "ticker"],
        &format!("tick {next}"),
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    kubectl_until(&["attach", "-n", &ns.name, "ticker"], "tick ")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}

#[tokio::test]
async fn a_killed_runtime_is_reported_and_its_pods_restart_per_policy() {
    let agent = test_node("runtime-kill", &[]).await;
    let ns = TestNamespace::new("runtime-kill").await;
    ns.create_bound_pod(&agent, "always", serde_json::json!({}), serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "tick", "image": example_image("ticker")}]})).await;
    ns.create_bound_pod(&agent, "never", serde_json::json!({}), serde_json::json!({"restartPolicy": "Never", "containers": [{"name": "tick", "image": example_image("ticker")}]})).await;
    ns.wait_pod(&agent, "always", "the Always ticker to run", |p| {
        phase(p) == "Running"
    })
    .await;
    ns.wait_pod(&agent, "never", "the Never ticker to run", |p| {
        phase(p) == "Running"
    })
    .await;

    // Watch the Node's Ready condition from before the kill: the runtime's absence must show.
    let nodes: Api<Node> = Api::all(Cluster::get().admin().await);
    let node_name = agent.name.clone();
    let (watching_tx, watching) = tokio::sync::oneshot::channel();
    let said_down = tokio::spawn(async move {
        use futures::StreamExt;
        let mut stream =
            std::pin::pin!(kube::runtime::watcher::watch_object(nodes, &node_name).boxed());
        let mut watching_tx = Some(watching_tx);
        while let Some(Ok(Some(node))) = stream.next().await {
            // The first item is the Node as it is now: from here on no change is missed.
            if let Some(tx) = watching_tx.take() {
                let _ = tx.send(());
            }
            let ready = node
                .status
                .and_then(|s| s.conditions)
                .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"));
            if let Some(c) = ready.filter(|c| c.status == "False") {
                return c.message.unwrap_or_default();
            }
        }
        String::new()
    });
    tokio::time::timeout(TEST_TIMEOUT, watching)
        .await
        .expect("the Node watch started")
        .expect("the watch task runs");
    let old = agent.kill_runtime().expect("a runtime process");

    let always = ns
        .wait_pod(&agent, "always", "the Always pod to run again", |p| {
            let c = status(p, "tick");
            c.restart_count == 1 && running(&c)
        })
        .await;
    let lost = status(&always, "tick")
        .last_state
        .and_then(|s| s.terminated)
        .expect("the lost run's state");
    assert_eq!(lost.reason.as_deref(), Some("ContainerStatusUnknown"));
    assert_eq!(lost.exit_code, 137);
    let never = ns
        .wait_pod(&agent, "never", "the Never pod to fail", |p| {
            phase(p) == "Failed"
        })
        .await;
    let ended = status(&never, "tick")
        .state
        .and_then(|s| s.terminated)
        .expect("terminated");
    assert_eq!(ended.reason.as_deref(), Some("ContainerStatusUnknown"));
    let new = agent.runtime_pid().expect("a new runtime process");
    assert_ne!(new, old);

    let message = tokio::time::timeout(TEST_TIMEOUT, said_down)
        .await
        .expect("the Node went NotReady")
        .unwrap();
    assert!(
        message.contains("container runtime"),
        "the Ready condition names the runtime: {message:?}"
    );
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(Cluster::get().admin().await, "default");
    wait_for(
        "ContainerRuntimeRestarted on the Node",
        TEST_TIMEOUT,
        || async {
            let list = events
                .list(
                    &kube::api::ListParams::default()
                        .fields(&format!("involvedObject.name={}", agent.name)),
                )
                .await
                .ok()?;
            let reasons: Vec<String> = list.items.into_iter().filter_map(|e| e.reason).collect();
            (reasons.iter().any(|r| r == "ContainerRuntimeDown")
                && reasons.iter().any(|r| r == "ContainerRuntimeRestarted"))
            .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}

#[tokio::test]
async fn a_guest_without_limits_dies_at_the_ceiling_and_the_agent_keeps_its_heartbeat() {
    // Pods get 256 MiB here (all the rest is reserved): the ceiling is reached quickly.
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap();
    let total_kib: u64 = meminfo
        .lines()
        .find_map(|l| l.strip_prefix("MemTotal:"))
        .unwrap()
        .trim()
        .trim_end_matches("kB")
        .trim()
        .parse()
        .unwrap();
    let reserved = format!("--system-reserved=memory={}Ki", total_kib - 256 * 1024);
    let agent = test_node("greedy", &[&reserved]).await;
    let ns = TestNamespace::new("greedy").await;

    // The runtime's own cgroup: the guests' ceiling plus the runtime's overhead.
    let runtime = agent.runtime_pid().expect("a runtime process");
    let cgroup = runtime_cgroup(runtime).unwrap_or_else(|| {
        panic!(
            "the runtime (pid {runtime}) is not in a cgroup of its own: {}",
            std::fs::read_to_string(format!("/proc/{runtime}/cgroup")).unwrap_or_default()
        )
    });
    let limit_file = if cgroup.join("memory.limit_in_bytes").exists() {
        "memory.limit_in_bytes"
    } else {
        "memory.max"
    };
    let limit: u64 = std::fs::read_to_string(cgroup.join(limit_file))
        .unwrap()
        .trim()
        .parse()
        .unwrap();
    assert_eq!(
        limit,
        (256 << 20) + (256 << 20),
        "ceiling 256 MiB + 256 MiB overhead"
    );
    let agent_cgroup =
        std::fs::read_to_string(format!("/proc/{}/cgroup", agent.pid().unwrap())).unwrap();
    assert!(
        !agent_cgroup.contains("wasm-kubelet-runtime-"),
        "the agent stays outside the runtime's cgroup"
    );

    let leases: Api<k8s_openapi::api::coordination::v1::Lease> =
        Api::namespaced(Cluster::get().admin().await, "kube-node-lease");
    let renew = || async {
        leases
            .get(&agent.name)
            .await
            .ok()?
            .spec?
            .renew_time
            .map(|t| t.0)
    };
    let renewed_before = wait_for("the node's lease", TEST_TIMEOUT, || async { renew().await })
        .await
        .unwrap();

    ns.create_bound_pod(
        &agent,
        "hog",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "hog", "image": example_image("memory-hog")}]}),
    )
    .await;
    let hog = ns
        .wait_pod(&agent, "hog", "the hog to be stopped", |p| {
            phase(p) == "Failed"
        })
        .await;
    let ended = status(&hog, "hog")
        .state
        .and_then(|s| s.terminated)
        .expect("terminated");
    assert_eq!(ended.reason.as_deref(), Some("OOMKilled"), "{ended:?}");
    assert_eq!(
        agent.runtime_pid(),
        Some(runtime),
        "the runtime survived the greedy guest"
    );
    // The heartbeat went on: the lease is renewed after the guest's end too.
    wait_for("the lease renewed after the hog", TEST_TIMEOUT, || async {
        renew().await.filter(|t| *t > renewed_before)
    })
    .await
    .unwrap();
    let node: Node = Api::all(Cluster::get().admin().await)
        .get(&agent.name)
        .await
        .unwrap();
    let ready = node
        .status
        .and_then(|s| s.conditions)
        .and_then(|cs| cs.into_iter().find(|c| c.type_ == "Ready"))
        .unwrap();
    assert_eq!(ready.status, "True", "{ready:?}");
}

#[tokio::test]
async fn a_pod_deleted_while_no_agent_runs_is_stopped_by_the_next_agent() {
    let mut agent = test_node("orphan", &[]).await;
    let ns = TestNamespace::new("orphan").await;
    ns.create_bound_pod(
        &agent,
        "gone",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "tick", "image": example_image("ticker")}]}),
    )
    .await;
    let pod = ns
        .wait_pod(&agent, "gone", "the ticker to run", |p| {
            phase(p) == "Running"
        })
        .await;
    let uid = pod.metadata.uid.clone().unwrap();

    agent.kill9();
    // Deleted outright while no agent runs: nothing on the node hears of it.
    ns.pods()
        .delete(
            "gone",
            &kube::api::DeleteParams {
                grace_period_seconds: Some(0),
                ..Default::default()
            },
        )
        .await
        .unwrap();
    wait_for("the pod object gone", TEST_TIMEOUT, || async {
        ns.pods()
            .get_opt("gone")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap();
    agent.spawn().unwrap();

    // The runtime still ran it; the new agent stops it, and its instance exits.
    wait_for(
        "the orphan's instance to exit in the runtime",
        TEST_TIMEOUT,
        || async {
            let log = agent.log();
            let stopped = log.lines().any(|l| {
                l.contains("stopping the containers of a pod gone while the agent was down")
                    && l.contains(&uid)
            });
            let exited = log
                .lines()
                .any(|l| l.contains(&uid) && l.contains("exited"));
            (stopped && exited).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}
