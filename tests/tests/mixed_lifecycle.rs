//! The lifecycle of CONTAINER pods on a mixed node, through the real API server: restart
//! policies and CrashLoopBackOff, OOMKilled, a CPU limit as the container's cgroup accounts it,
//! graceful deletion (SIGTERM handled, SIGTERM ignored then SIGKILL), image garbage collection
//! in containerd's image store, an agent killed with SIGKILL adopting the running container,
//! and an image whose `User` is a name.
//!
//! Every test has a node of its own (`MixedNode`, busybox from the local registry). Network
//! safety: the only traffic is from the test to its pods' addresses in the node's pod CIDR
//! (which no route covers) and to the local registry on loopback.

use std::process::Stdio;
use std::time::{Duration, Instant};

use integration_tests::mixed_node::{pod_ip, MixedNode};
use integration_tests::registry::{Registry, OCI_MANIFEST};
use integration_tests::{
    http_get, phase, unique_name, wait_for, Agent, Cluster, CpuOffer, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::Api;
use tokio::io::AsyncBufReadExt;

fn status(pod: &Pod, name: &str) -> Option<ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
        .cloned()
}

fn waiting_reason(c: &ContainerStatus) -> Option<String> {
    c.state.as_ref()?.waiting.as_ref()?.reason.clone()
}

/// (exit code, reason) of the container's current state, when it is terminated.
fn terminated(c: &ContainerStatus) -> Option<(i32, String)> {
    let t = c.state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

/// (exit code, reason) of the container's last state, when it is terminated.
fn last_terminated(c: &ContainerStatus) -> Option<(i32, String)> {
    let t = c.last_state.as_ref()?.terminated.as_ref()?;
    Some((t.exit_code, t.reason.clone().unwrap_or_default()))
}

fn running(c: &ContainerStatus) -> bool {
    c.state.as_ref().is_some_and(|s| s.running.is_some())
}

/// The containerd container ID of the pod's container `name` (`containerd://<id>`).
fn container_id(pod: &Pod, name: &str) -> String {
    let uri = status(pod, name)
        .and_then(|c| c.container_id)
        .unwrap_or_default();
    uri.strip_prefix("containerd://")
        .unwrap_or_else(|| panic!("not a containerd container ID: {uri:?}"))
        .to_string()
}

/// A pod of one busybox container `c` running `script` with `sh -c`; `extra` is merged over the
/// container (resources, ...), `spec` over the pod spec.
fn busybox_pod(
    script: &str,
    extra: serde_json::Value,
    spec: serde_json::Value,
) -> serde_json::Value {
    let mut container = serde_json::json!({
        "name": "c",
        "image": MixedNode::busybox(),
        "command": ["sh", "-c", script],
    });
    if let (Some(c), serde_json::Value::Object(extra)) = (container.as_object_mut(), extra) {
        c.extend(extra);
    }
    let mut full = serde_json::json!({"containers": [container]});
    if let (Some(f), serde_json::Value::Object(spec)) = (full.as_object_mut(), spec) {
        f.extend(spec);
    }
    full
}

/// `kubectl logs <pod>` in the namespace (stdout, or stdout and stderr on failure).
fn kubectl_logs(ns: &TestNamespace, pod: &str) -> String {
    let out = Cluster::get()
        .kubectl()
        .args(["logs", "-n", &ns.name, pod])
        .output()
        .expect("kubectl logs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    if out.status.success() {
        text
    } else {
        format!("{text}{}", String::from_utf8_lossy(&out.stderr))
    }
}

/// Follows `kubectl logs -f` from now until the stream ends (or the test's time-out); the
/// lines it read, and whether the stream ended by itself.
fn follow_logs(ns: &TestNamespace, pod: &str) -> tokio::task::JoinHandle<(Vec<String>, bool)> {
    let mut child = tokio::process::Command::from(Cluster::get().kubectl())
        .args(["logs", "-f", "-n", &ns.name, pod])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .kill_on_drop(true)
        .spawn()
        .expect("kubectl logs -f");
    let stdout = child.stdout.take().expect("stdout");
    tokio::spawn(async move {
        let mut lines = tokio::io::BufReader::new(stdout).lines();
        let mut seen = Vec::new();
        let ended = tokio::time::timeout(TEST_TIMEOUT, async {
            while let Ok(Some(line)) = lines.next_line().await {
                seen.push(line);
            }
        })
        .await
        .is_ok();
        let _ = child.kill().await;
        (seen, ended)
    })
}

/// Watches pod `name` from now until it is gone from the API server; every version seen.
async fn watch_until_gone(api: Api<Pod>, name: &str) -> tokio::task::JoinHandle<Vec<Pod>> {
    use futures::StreamExt;
    let (started_tx, started) = tokio::sync::oneshot::channel();
    let name = name.to_string();
    let handle = tokio::spawn(async move {
        let mut stream = std::pin::pin!(kube::runtime::watcher::watch_object(api, &name).boxed());
        let mut started_tx = Some(started_tx);
        let mut seen = Vec::new();
        let _ = tokio::time::timeout(TEST_TIMEOUT, async {
            while let Some(Ok(pod)) = stream.next().await {
                // The first item is the pod as it is now: from here on no change is missed.
                if let Some(tx) = started_tx.take() {
                    let _ = tx.send(());
                }
                match pod {
                    Some(pod) => seen.push(pod),
                    None if !seen.is_empty() => return,
                    None => {}
                }
            }
        })
        .await;
        seen
    });
    tokio::time::timeout(TEST_TIMEOUT, started)
        .await
        .expect("the pod watch started")
        .expect("the watch task runs");
    handle
}

async fn wait_gone(ns: &TestNamespace, agent: &Agent, name: &str) {
    let pods = ns.pods();
    wait_for(&format!("pod {name} to go"), TEST_TIMEOUT, || async {
        pods.get_opt(name)
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
}

/// The container's cumulative CPU time (ns) from its cgroup v1 `cpuacct.usage`.
fn cpuacct_usage(node: &MixedNode, id: &str) -> u64 {
    let file = std::path::Path::new("/sys/fs/cgroup/cpuacct/wasm-kubelet")
        .join(&node.leftovers.namespace)
        .join(id)
        .join("cpuacct.usage");
    std::fs::read_to_string(&file)
        .unwrap_or_else(|e| panic!("{}: {e}", file.display()))
        .trim()
        .parse()
        .expect("cpuacct.usage is a number")
}

/// How many CFS periods the container was throttled in (cgroup v1 `cpu.stat`).
fn nr_throttled(node: &MixedNode, id: &str) -> u64 {
    let file = std::path::Path::new("/sys/fs/cgroup/cpu/wasm-kubelet")
        .join(&node.leftovers.namespace)
        .join(id)
        .join("cpu.stat");
    let text = std::fs::read_to_string(&file).unwrap_or_else(|e| panic!("{}: {e}", file.display()));
    text.lines()
        .find_map(|l| l.strip_prefix("nr_throttled "))
        .and_then(|n| n.trim().parse().ok())
        .expect("nr_throttled in cpu.stat")
}

/// Pushes `$REGISTRY/busybox:<tag>`: busybox:1's layer with its image config changed by
/// `edit` (the `config` object); returns the reference.
fn push_busybox_variant(tag: &str, edit: impl FnOnce(&mut serde_json::Value)) -> String {
    let registry = Registry::plain();
    let manifest = registry.fetch("busybox", "manifests/1", Some(OCI_MANIFEST));
    let mut manifest: serde_json::Value = serde_json::from_str(&manifest).expect("manifest");
    let config_digest = manifest["config"]["digest"].as_str().unwrap().to_string();
    let config = registry.fetch("busybox", &format!("blobs/{config_digest}"), None);
    let mut config: serde_json::Value = serde_json::from_str(&config).expect("image config");
    edit(&mut config["config"]);
    let config_type = manifest["config"]["mediaType"]
        .as_str()
        .unwrap()
        .to_string();
    manifest["config"] = registry.push_blob("busybox", &config_type, config.to_string().as_bytes());
    registry.push_manifest("busybox", tag, OCI_MANIFEST, &manifest);
    registry.reference("busybox", tag)
}

#[tokio::test]
async fn restart_policies_crash_loop_back_off_and_exit_codes() {
    let node = MixedNode::start("life-restart", &[]).await;
    let agent = &node.agent;
    let ns = TestNamespace::new("life-restart").await;
    let fails = "echo run; exit 3";
    for (name, policy, script) in [
        ("always", "Always", fails),
        ("never", "Never", fails),
        ("onfailure", "OnFailure", "echo run; exit 0"),
    ] {
        ns.create_bound_pod(
            agent,
            name,
            serde_json::json!({}),
            busybox_pod(
                script,
                serde_json::json!({}),
                serde_json::json!({"restartPolicy": policy}),
            ),
        )
        .await;
    }

    // Always: it crashes, is restarted, and waits in CrashLoopBackOff between runs.
    let backing_off = ns
        .wait_pod(agent, "always", "CrashLoopBackOff after exit 3", |p| {
            status(p, "c").is_some_and(|c| {
                c.restart_count >= 1
                    && waiting_reason(&c).as_deref() == Some("CrashLoopBackOff")
                    && last_terminated(&c).is_some()
            })
        })
        .await;
    let c = status(&backing_off, "c").unwrap();
    assert_eq!(last_terminated(&c), Some((3, "Error".into())), "{c:?}");
    assert_eq!(
        phase(&backing_off),
        "Running",
        "an Always pod that crashes stays Running"
    );
    let again = ns
        .wait_pod(agent, "always", "a second restart", |p| {
            status(p, "c").is_some_and(|c| c.restart_count >= 2)
        })
        .await;
    let c = status(&again, "c").unwrap();
    assert_eq!(last_terminated(&c), Some((3, "Error".into())), "{c:?}");
    assert!(
        kubectl_logs(&ns, "always").contains("run"),
        "the crashing container's output is its log"
    );
    let previous = Cluster::get()
        .kubectl()
        .args(["logs", "--previous", "-n", &ns.name, "always"])
        .output()
        .expect("kubectl logs --previous");
    assert!(
        String::from_utf8_lossy(&previous.stdout).contains("run"),
        "kubectl logs --previous: {}{}",
        String::from_utf8_lossy(&previous.stdout),
        String::from_utf8_lossy(&previous.stderr)
    );

    // Never: the pod fails with the exit code, no restart.
    let never = ns
        .wait_pod(agent, "never", "the Never pod to fail", |p| {
            phase(p) == "Failed"
        })
        .await;
    let c = status(&never, "c").unwrap();
    assert_eq!(terminated(&c), Some((3, "Error".into())), "{c:?}");
    assert_eq!(c.restart_count, 0);

    // OnFailure with exit 0: done, Succeeded, never restarted.
    let done = ns
        .wait_pod(agent, "onfailure", "the OnFailure pod to succeed", |p| {
            phase(p) == "Succeeded"
        })
        .await;
    let c = status(&done, "c").unwrap();
    assert_eq!(terminated(&c), Some((0, "Completed".into())), "{c:?}");
    assert_eq!(c.restart_count, 0);
}

#[tokio::test]
async fn a_container_over_its_memory_limit_is_oom_killed() {
    let node = MixedNode::start("life-oom", &[]).await;
    let agent = &node.agent;
    let ns = TestNamespace::new("life-oom").await;
    // tail keeps the last "line" in memory: 200 MiB of zeros with no newline.
    ns.create_bound_pod(
        agent,
        "hog",
        serde_json::json!({}),
        busybox_pod(
            "head -c 200m /dev/zero | tail",
            serde_json::json!({"resources": {"limits": {"memory": "32Mi"}}}),
            serde_json::json!({"restartPolicy": "Never"}),
        ),
    )
    .await;
    let hog = ns
        .wait_pod(agent, "hog", "the hog to be killed", |p| {
            phase(p) == "Failed"
        })
        .await;
    let c = status(&hog, "c").unwrap();
    assert_eq!(terminated(&c), Some((137, "OOMKilled".into())), "{c:?}");

    // With restartPolicy Always the OOM kill is the last state of the restarted container.
    ns.create_bound_pod(
        agent,
        "again",
        serde_json::json!({}),
        busybox_pod(
            "head -c 200m /dev/zero | tail",
            serde_json::json!({"resources": {"limits": {"memory": "32Mi"}}}),
            serde_json::json!({"restartPolicy": "Always"}),
        ),
    )
    .await;
    let again = ns
        .wait_pod(agent, "again", "the OOM kill as the last state", |p| {
            status(p, "c").is_some_and(|c| last_terminated(&c).is_some())
        })
        .await;
    let c = status(&again, "c").unwrap();
    assert_eq!(
        last_terminated(&c),
        Some((137, "OOMKilled".into())),
        "{c:?}"
    );
}

#[tokio::test]
async fn a_cpu_limit_of_200m_holds_a_busy_container_near_a_fifth_of_a_core() {
    let node = MixedNode::start("life-cpu", &[]).await;
    let agent = &node.agent;
    let ns = TestNamespace::new("life-cpu").await;
    let spin = "while :; do :; done";
    for (name, resources) in [
        ("limited", serde_json::json!({"limits": {"cpu": "200m"}})),
        // The control requests what the limited one gets as its request (200m: cpu.shares 204
        // for both), so the CPU scheduler treats them alike but for the quota.
        ("free", serde_json::json!({"requests": {"cpu": "200m"}})),
    ] {
        ns.create_bound_pod(
            agent,
            name,
            serde_json::json!({}),
            busybox_pod(
                spin,
                serde_json::json!({"resources": resources}),
                serde_json::json!({"restartPolicy": "Always"}),
            ),
        )
        .await;
    }
    let mut ids = Vec::new();
    for name in ["limited", "free"] {
        let pod = ns
            .wait_pod(agent, name, "the busy loop to run", |p| {
                phase(p) == "Running"
            })
            .await;
        ids.push(container_id(&pod, "c"));
    }
    let throttled0 = nr_throttled(&node, &ids[0]);
    let offer = CpuOffer::start();
    let (t0, u0) = (
        Instant::now(),
        ids.iter()
            .map(|id| cpuacct_usage(&node, id))
            .collect::<Vec<_>>(),
    );
    // Measuring needs wall time to pass: this sleep is the measurement window, not a wait for
    // a condition.
    tokio::time::sleep(Duration::from_secs(6)).await;
    let u1: Vec<u64> = ids.iter().map(|id| cpuacct_usage(&node, id)).collect();
    let wall = t0.elapsed().as_secs_f64();
    let offered = offer.finish();
    let throttled = nr_throttled(&node, &ids[0]) - throttled0;
    let rates: Vec<f64> = u0
        .iter()
        .zip(&u1)
        .map(|(a, b)| (b - a) as f64 / 1e9 / wall)
        .collect();
    let (limited, free) = (rates[0], rates[1]);
    println!("over {wall:.1} s: limited to 200m {limited:.3} cores, unlimited {free:.3} cores; a native busy thread got {offered:.3}; the limited one throttled in {throttled} periods");
    // The quota bites: without a limit no period is ever throttled. (On a loaded machine the
    // loop may seldom reach 20 ms in a period: wait for one if the window had none.)
    if throttled == 0 {
        wait_for("a throttled period", TEST_TIMEOUT, || async {
            (nr_throttled(&node, &ids[0]) > throttled0).then_some(())
        })
        .await
        .expect("the limited container is throttled by its CFS quota");
    }
    // The CFS quota is a ceiling whatever else runs: 20 % of a core, with room for the
    // accounting granularity (a period is 100 ms).
    assert!(
        limited < 0.35,
        "a 200m limit holds a busy loop to about 0.2 cores, measured {limited:.3}"
    );
    // Below it a loop gets what the machine offers (a loaded 2-core machine offers a busy
    // thread a fraction of a core): the limited loop reaches half of its quota or of what its
    // twin without a limit got; the twin gets more than the quota whenever the machine offers
    // a busy thread clearly more (a missing limit would make the two alike).
    assert!(
        limited >= 0.5 * free.min(0.2),
        "a 200m-limited loop runs up to its quota: {limited:.3}, its unlimited twin {free:.3}"
    );
    if offered >= 0.5 {
        assert!(
            free > 1.2 * limited,
            "without the quota the twin runs faster: {free:.3} vs {limited:.3} ({offered:.3} offered)"
        );
    }
}

#[tokio::test]
async fn deleting_a_pod_sends_term_then_kill_after_the_grace_period() {
    let node = MixedNode::start("life-grace", &[]).await;
    let agent = &node.agent;
    let ns = TestNamespace::new("life-grace").await;
    // Handles TERM: says bye and exits 0. The default grace period (30 s).
    ns.create_bound_pod(
        agent,
        "polite",
        serde_json::json!({}),
        busybox_pod(
            "trap 'echo bye; exit 0' TERM; echo ready; while :; do sleep 1; done",
            serde_json::json!({}),
            serde_json::json!({"terminationGracePeriodSeconds": 30}),
        ),
    )
    .await;
    // Ignores TERM (says so, and goes on): killed after its 3 s grace period.
    ns.create_bound_pod(
        agent,
        "stubborn",
        serde_json::json!({}),
        busybox_pod(
            "trap 'echo ignoring TERM' TERM; echo ready; while :; do sleep 1; done",
            serde_json::json!({}),
            serde_json::json!({"terminationGracePeriodSeconds": 3}),
        ),
    )
    .await;
    for name in ["polite", "stubborn"] {
        ns.wait_pod(agent, name, "the container to run", |p| {
            phase(p) == "Running" && status(p, "c").is_some_and(|c| running(&c))
        })
        .await;
        wait_for("the container's first line", TEST_TIMEOUT, || async {
            kubectl_logs(&ns, name).contains("ready").then_some(())
        })
        .await
        .unwrap();
    }
    let (polite_log, stubborn_log) = (follow_logs(&ns, "polite"), follow_logs(&ns, "stubborn"));
    let polite_watch = watch_until_gone(ns.pods(), "polite").await;
    let stubborn_watch = watch_until_gone(ns.pods(), "stubborn").await;
    // The pods still run as the deletion is asked for: nothing stopped them before TERM.
    for name in ["polite", "stubborn"] {
        let pod = ns.pods().get(name).await.unwrap();
        assert!(
            status(&pod, "c").is_some_and(|c| running(&c)),
            "{name}: {:?}",
            pod.status
        );
        ns.pods().delete(name, &Default::default()).await.unwrap();
    }
    let asked = Instant::now();
    wait_gone(&ns, agent, "polite").await;
    // A figure for the report, not an assertion: the time the node took.
    println!(
        "polite pod gone {:.1} s after the delete",
        asked.elapsed().as_secs_f64()
    );
    wait_gone(&ns, agent, "stubborn").await;
    println!(
        "stubborn pod gone {:.1} s after the delete",
        asked.elapsed().as_secs_f64()
    );

    let last_state = |pods: Vec<Pod>| {
        pods.iter()
            .rev()
            .find_map(|p| status(p, "c").and_then(|c| terminated(&c)))
    };
    let polite = polite_watch.await.unwrap();
    assert_eq!(
        last_state(polite),
        Some((0, "Completed".into())),
        "TERM handled: exit 0"
    );
    let (lines, follow_ended) = polite_log.await.unwrap();
    assert!(
        follow_ended,
        "kubectl logs -f ends once the container is gone: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "bye"),
        "the TERM handler ran: {lines:?}"
    );

    let stubborn = stubborn_watch.await.unwrap();
    let ended = last_state(stubborn);
    let (lines, follow_ended) = stubborn_log.await.unwrap();
    assert!(
        follow_ended,
        "kubectl logs -f ends once the container is gone: {lines:?}"
    );
    assert!(
        lines.iter().any(|l| l == "ignoring TERM"),
        "TERM came first: {lines:?}"
    );
    assert_eq!(
        ended.map(|(code, _)| code),
        Some(137),
        "SIGKILLed after the grace period"
    );
    // Neither container is left in containerd.
    assert_eq!(node.ctr(&["tasks", "list", "-q"]).trim(), "");
    assert_eq!(node.ctr(&["containers", "list", "-q"]).trim(), "");
}

#[tokio::test]
async fn image_gc_removes_an_unused_container_image_from_containerd_and_keeps_the_used_one() {
    // Every image no container uses is collected (thresholds 0 %: always over, down to 0).
    let node = MixedNode::start(
        "life-gc",
        &[
            "--image-gc-period=1s",
            "--minimum-image-ttl-duration=0s",
            "--image-gc-high-threshold=0",
            "--image-gc-low-threshold=0",
        ],
    )
    .await;
    let agent = &node.agent;
    let ns = TestNamespace::new("life-gc").await;
    // An image of its own (a distinct digest), so nothing else holds it.
    let tag = unique_name("gc");
    let unused = push_busybox_variant(&tag, |config| {
        config["Env"]
            .as_array_mut()
            .unwrap()
            .push(format!("VARIANT={tag}").into());
    });
    let busybox = MixedNode::busybox();
    ns.create_bound_pod(
        agent,
        "keep",
        serde_json::json!({}),
        busybox_pod(
            "while :; do sleep 1; done",
            serde_json::json!({}),
            serde_json::json!({}),
        ),
    )
    .await;
    ns.wait_pod(agent, "keep", "the pod using busybox:1 to run", |p| {
        phase(p) == "Running"
    })
    .await;
    ns.create_bound_pod(
        agent,
        "once",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": unused, "command": ["true"]}]}),
    )
    .await;
    ns.wait_pod(agent, "once", "the pod of the other image done", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    // Its exited container still holds the image.
    let images = node.ctr(&["images", "list", "-q"]);
    assert!(images.lines().any(|l| l == unused), "{images}");
    ns.pods().delete("once", &Default::default()).await.unwrap();
    wait_gone(&ns, agent, "once").await;

    wait_for("the unused image collected", TEST_TIMEOUT, || async {
        let images = node.ctr(&["images", "list", "-q"]);
        (!images.lines().any(|l| l == unused)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let images = node.ctr(&["images", "list", "-q"]);
    assert!(
        images.lines().any(|l| l == busybox),
        "the image in use stays: {images}"
    );
    // The line is written once containerd's removal returns, just after the image is gone.
    wait_for("the agent to log the collection", TEST_TIMEOUT, || async {
        agent
            .log()
            .contains("image garbage-collected")
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let keep = ns.pods().get("keep").await.unwrap();
    assert_eq!(phase(&keep), "Running");
    assert_eq!(status(&keep, "c").unwrap().restart_count, 0);
}

/// The numbers of the `line N` lines, in order.
fn numbered(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.strip_prefix("line ")?.trim().parse().ok())
        .collect()
}

#[tokio::test]
async fn an_agent_killed_with_sigkill_adopts_the_running_container() {
    let mut node = MixedNode::start("life-adopt", &[]).await;
    let ns = TestNamespace::new("life-adopt").await;
    let created = ns
        .create_bound_pod(
            &node.agent,
            "web",
            serde_json::json!({}),
            busybox_pod(
                "i=0; while :; do i=$((i+1)); echo line $i; sleep 1; done & exec httpd -f -p 8080",
                serde_json::json!({}),
                serde_json::json!({"restartPolicy": "Always"}),
            ),
        )
        .await;
    let uid = created.metadata.uid.clone().unwrap();
    let before = ns
        .wait_pod(&node.agent, "web", "httpd to run with its IP", |p| {
            phase(p) == "Running" && pod_ip(p).is_some()
        })
        .await;
    let ip = pod_ip(&before).unwrap();
    let id = container_id(&before, "c");
    wait_for("httpd to answer", TEST_TIMEOUT, || async {
        http_get(&ip, 8080, "/").await.ok()
    })
    .await
    .unwrap();
    let seen_before = wait_for("two log lines", TEST_TIMEOUT, || async {
        let n = numbered(&kubectl_logs(&ns, "web"));
        (n.len() >= 2).then_some(n)
    })
    .await
    .unwrap();

    node.agent.kill9();
    node.agent.spawn().unwrap();
    let agent = &node.agent;
    wait_for(
        "the new agent to adopt the container",
        TEST_TIMEOUT,
        || async {
            agent
                .log()
                .lines()
                .any(|l| l.contains("adopted a running container") && l.contains(&id))
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    // Lines from after the restart reach the log, none lost while no agent read them.
    let last_before = *seen_before.last().unwrap();
    let after = wait_for("log lines from after the restart", TEST_TIMEOUT, || async {
        let n = numbered(&kubectl_logs(&ns, "web"));
        (n.last().is_some_and(|l| *l >= last_before + 5)).then_some(n)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert!(
        after.iter().zip(1u64..).all(|(n, want)| *n == want),
        "log lines are consecutive from 1: {after:?}"
    );

    let now = ns.pods().get("web").await.unwrap();
    let c = status(&now, "c").unwrap();
    assert_eq!(container_id(&now, "c"), id, "the same container");
    assert_eq!(c.restart_count, 0);
    assert!(running(&c), "{:?}", c.state);
    assert_eq!(pod_ip(&now).as_deref(), Some(ip.as_str()), "the same IP");
    let containers = node.ctr(&["containers", "list", "-q"]);
    assert_eq!(
        containers.lines().collect::<Vec<_>>(),
        [id.as_str()],
        "one container"
    );
    let (code, _) = http_get(&ip, 8080, "/")
        .await
        .expect("httpd still answers on the pod's IP");
    assert!(code == 200 || code == 404, "HTTP {code}");

    // The new agent still stops it and removes its network namespace.
    let netns = node.root().join("pod-network/namespaces").join(&uid);
    assert!(netns.exists(), "{}", netns.display());
    ns.pods().delete("web", &Default::default()).await.unwrap();
    wait_gone(&ns, agent, "web").await;
    wait_for(
        "the container and the netns to go",
        TEST_TIMEOUT,
        || async {
            (node.ctr(&["tasks", "list", "-q"]).trim().is_empty()
                && node.ctr(&["containers", "list", "-q"]).trim().is_empty()
                && !netns.exists())
            .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}

#[tokio::test]
async fn an_image_with_a_named_user_is_refused_not_run_as_root() {
    let node = MixedNode::start("life-user", &[]).await;
    let agent = &node.agent;
    let ns = TestNamespace::new("life-user").await;
    let image = push_busybox_variant("user-nobody", |config| {
        config["User"] = "nobody".into();
    });
    ns.create_bound_pod(
        agent,
        "named",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": image, "command": ["sleep", "3600"]}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "named", "the container refused", |p| {
            status(p, "c").is_some_and(|c| {
                waiting_reason(&c).is_some_and(|r| r.starts_with("CreateContainer"))
            })
        })
        .await;
    let c = status(&pod, "c").unwrap();
    let message = c
        .state
        .as_ref()
        .and_then(|s| s.waiting.as_ref())
        .and_then(|w| w.message.clone())
        .unwrap_or_default();
    assert!(
        message.contains("\"nobody\""),
        "the reason names the user: {message:?}"
    );
    ns.wait_events(agent, "named", "a Failed event naming the user", |events| {
        events
            .iter()
            .any(|(r, m)| r == "Failed" && m.contains("\"nobody\""))
    })
    .await;
    assert_eq!(
        node.ctr(&["tasks", "list", "-q"]).trim(),
        "",
        "nothing ran in containerd"
    );
}

#[tokio::test]
async fn what_a_container_does_while_no_agent_runs_is_reported_by_the_next_agent() {
    let mut node = MixedNode::start("life-down", &[]).await;
    let ns = TestNamespace::new("life-down").await;
    // Exits with code 4 and last words when the test signals it (while no agent runs).
    ns.create_bound_pod(
        &node.agent,
        "exiting",
        serde_json::json!({}),
        busybox_pod(
            "trap 'echo last words; exit 4' USR1; echo ready; while :; do sleep 1; done",
            serde_json::json!({}),
            serde_json::json!({"restartPolicy": "Never"}),
        ),
    )
    .await;
    // Crash-loops all along.
    ns.create_bound_pod(
        &node.agent,
        "crashy",
        serde_json::json!({}),
        busybox_pod(
            "echo run; exit 3",
            serde_json::json!({}),
            serde_json::json!({"restartPolicy": "Always"}),
        ),
    )
    .await;
    let running_pod = ns
        .wait_pod(&node.agent, "exiting", "the container to run", |p| {
            status(p, "c").is_some_and(|c| running(&c))
        })
        .await;
    let id = container_id(&running_pod, "c");
    wait_for("the container's first line", TEST_TIMEOUT, || async {
        kubectl_logs(&ns, "exiting").contains("ready").then_some(())
    })
    .await
    .unwrap();
    let crash_before = ns
        .wait_pod(
            &node.agent,
            "crashy",
            "the crash loop to restart once",
            |p| status(p, "c").is_some_and(|c| c.restart_count >= 1),
        )
        .await;
    let crash_before = status(&crash_before, "c").unwrap().restart_count;

    exit_while_no_agent_runs(&mut node, &id, "the task to exit while no agent runs").await;
    let agent = &node.agent;

    let ended = ns
        .wait_pod(agent, "exiting", "the exit reported", |p| {
            phase(p) == "Failed"
        })
        .await;
    let c = status(&ended, "c").unwrap();
    assert_eq!(terminated(&c), Some((4, "Error".into())), "{c:?}");
    assert_eq!(container_id(&ended, "c"), id);

    // The crash loop goes on where it was: its count does not start over, no run was lost.
    let crashy = ns
        .wait_pod(agent, "crashy", "the crash loop to go on", |p| {
            status(p, "c").is_some_and(|c| c.restart_count > crash_before)
        })
        .await;
    let c = status(&crashy, "c").unwrap();
    assert_eq!(last_terminated(&c), Some((3, "Error".into())), "{c:?}");
}

/// A container that writes and exits while no agent runs: its last output reaches the log.
/// (Its stdout/stderr are read by the log driver the shim runs, `binary://`, which outlives
/// the agent; with FIFOs read by the agent that output was dropped with the FIFO.)
#[tokio::test]
async fn output_written_before_an_exit_while_no_agent_runs_reaches_the_log() {
    let mut node = MixedNode::start("life-lastwords", &[]).await;
    let ns = TestNamespace::new("life-lastwords").await;
    ns.create_bound_pod(
        &node.agent,
        "exiting",
        serde_json::json!({}),
        busybox_pod(
            "trap 'echo last words; exit 4' USR1; echo ready; while :; do sleep 1; done",
            serde_json::json!({}),
            serde_json::json!({"restartPolicy": "Never"}),
        ),
    )
    .await;
    let pod = ns
        .wait_pod(&node.agent, "exiting", "the container to run", |p| {
            status(p, "c").is_some_and(|c| running(&c))
        })
        .await;
    let id = container_id(&pod, "c");
    wait_for("the container's first line", TEST_TIMEOUT, || async {
        kubectl_logs(&ns, "exiting").contains("ready").then_some(())
    })
    .await
    .unwrap();
    exit_while_no_agent_runs(&mut node, &id, "the task to exit while no agent runs").await;
    ns.wait_pod(&node.agent, "exiting", "the exit reported", |p| {
        phase(p) == "Failed"
    })
    .await;
    let logs = kubectl_logs(&ns, "exiting");
    assert!(
        logs.contains("last words"),
        "what it wrote while no agent ran is in its log: {logs:?}"
    );
}

/// The CRI log entries of every `*.log` file under `dir`, as (stream, tag, content).
fn cri_entries(dir: &std::path::Path) -> Vec<(String, String, String)> {
    let mut files = Vec::new();
    let mut todo = vec![dir.to_path_buf()];
    while let Some(d) = todo.pop() {
        for entry in std::fs::read_dir(&d).into_iter().flatten().flatten() {
            let path = entry.path();
            if path.is_dir() {
                todo.push(path);
            } else if path.extension().is_some_and(|e| e == "log") {
                files.push(path);
            }
        }
    }
    let mut entries = Vec::new();
    for file in files {
        for line in std::fs::read_to_string(&file).unwrap().lines() {
            let mut parts = line.splitn(4, ' ');
            let (ts, stream, tag) = (parts.next(), parts.next(), parts.next());
            let content = parts.next().unwrap_or("");
            assert!(
                ts.is_some_and(|t| t.parse::<jiff::Timestamp>().is_ok()),
                "CRI entry without an RFC 3339 timestamp: {line:?}"
            );
            assert!(matches!(stream, Some("stdout" | "stderr")), "{line:?}");
            assert!(matches!(tag, Some("F" | "P")), "{line:?}");
            entries.push((stream.unwrap().into(), tag.unwrap().into(), content.into()));
        }
    }
    entries
}

/// A container writing far more than a pipe holds (1 MiB, numbered lines) while no agent runs
/// is not blocked: it finishes and exits 0 while the agent is down, and once the agent is back
/// the pod is Succeeded and its CRI log has every line, in order.
#[tokio::test]
async fn a_megabyte_written_while_no_agent_runs_neither_blocks_nor_is_lost() {
    const LINES: usize = 20_000;
    let mut node = MixedNode::start("life-flood", &[]).await;
    let ns = TestNamespace::new("life-flood").await;
    // Each line is 52 bytes: 20 000 of them are 1 MiB, 16 times a pipe's 64 KiB.
    let script = format!(
        "trap 'i=0; while [ $i -lt {LINES} ]; do printf \"line %05d %s\\n\" $i \
         0123456789012345678901234567890123456789; i=$((i+1)); done; exit 0' USR1; \
         echo ready; while :; do sleep 1; done"
    );
    ns.create_bound_pod(
        &node.agent,
        "flood",
        serde_json::json!({}),
        busybox_pod(
            &script,
            serde_json::json!({}),
            serde_json::json!({"restartPolicy": "Never"}),
        ),
    )
    .await;
    let pod = ns
        .wait_pod(&node.agent, "flood", "the container to run", |p| {
            status(p, "c").is_some_and(|c| running(&c))
        })
        .await;
    let id = container_id(&pod, "c");
    wait_for("the container's first line", TEST_TIMEOUT, || async {
        kubectl_logs(&ns, "flood").contains("ready").then_some(())
    })
    .await
    .unwrap();
    exit_while_no_agent_runs(
        &mut node,
        &id,
        "the task to write 1 MiB and exit while no agent runs",
    )
    .await;
    let ended = ns
        .wait_pod(&node.agent, "flood", "the exit reported", |p| {
            phase(p) == "Succeeded"
        })
        .await;
    let c = status(&ended, "c").unwrap();
    assert_eq!(terminated(&c), Some((0, "Completed".into())), "{c:?}");
    let entries = cri_entries(&node.agent.dir.join("logs"));
    let lines: Vec<&str> = entries
        .iter()
        .filter(|(stream, tag, _)| stream == "stdout" && tag == "F")
        .map(|(_, _, content)| content.as_str())
        .filter(|c| c.starts_with("line "))
        .collect();
    let expected: Vec<String> = (0..LINES)
        .map(|i| format!("line {i:05} 0123456789012345678901234567890123456789"))
        .collect();
    assert_eq!(lines.len(), LINES, "every line is in the log once");
    assert!(
        lines.iter().zip(&expected).all(|(a, b)| a == b),
        "the lines are in order and whole"
    );
}

/// Kills the agent (SIGKILL), makes container `id` exit with SIGUSR1 (the tests' containers
/// trap it) while no agent runs, waits for containerd to show the task stopped, and starts the
/// agent again.
async fn exit_while_no_agent_runs(node: &mut MixedNode, id: &str, what: &str) {
    node.agent.kill9();
    node.ctr(&["tasks", "kill", "-s", "SIGUSR1", id]);
    wait_for(what, TEST_TIMEOUT, || async {
        node.ctr(&["tasks", "list"])
            .lines()
            .any(|l| l.starts_with(id) && l.contains("STOPPED"))
            .then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", node.ctr(&["tasks", "list"])));
    node.agent.spawn().unwrap();
}
