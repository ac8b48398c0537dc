//! wasi:http components served by the agent, end to end: `http-health` pods (wasm-examples)
//! created through the real API server and reached at the pod IP (the node IP) and port, by
//! this test's own HTTP client and by the real kubectl's port-forward; readiness probes that hit
//! the component itself; the concurrency bound; port conflicts at admission; the outbound
//! hosts policy for wasi:http and wasi:sockets. One node and one namespace per test.

use integration_tests::port_forward::PortForward;
use integration_tests::{
    example_image, http_get as get, phase, test_node, wait_for, Agent, Cluster, TestNamespace,
    TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::{DeleteParams, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// `N` ports free on `ip` (the test node's own address), for the pods to declare: chosen by
/// the kernel rather than fixed, so a listener elsewhere on the machine on a well-known port
/// (on 0.0.0.0, which conflicts with every address) cannot make a test fail. The listeners
/// are held until all `N` are chosen, so the ports differ.
fn free_ports<const N: usize>(ip: &str) -> [u16; N] {
    let listeners: Vec<std::net::TcpListener> = (0..N)
        .map(|_| std::net::TcpListener::bind((ip, 0)).expect("a free port on the node IP"))
        .collect();
    std::array::from_fn(|i| listeners[i].local_addr().expect("a bound address").port())
}

async fn node(what: &str) -> Agent {
    test_node(what, &[]).await
}

/// An `http-health` pod serving on `port`, with an emptyDir for its state at /data;
/// `annotations` and `container` are merged into the pod's metadata and its container.
async fn http_pod(
    ns: &TestNamespace,
    agent: &Agent,
    port: u16,
    name: &str,
    annotations: serde_json::Value,
    container: serde_json::Value,
) -> Pod {
    let mut c = serde_json::json!({
        "name": "web", "image": example_image("http-health"),
        "ports": [{"name": "http", "containerPort": port}],
        "env": [{"name": "GREETING", "value": "hello from the pod spec"}],
        "volumeMounts": [{"name": "data", "mountPath": "/data"}],
    });
    c.as_object_mut()
        .unwrap()
        .extend(container.as_object().unwrap().clone());
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name, "annotations": annotations},
        "spec": {
            "nodeName": agent.name, "terminationGracePeriodSeconds": 5,
            "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [c],
        }
    }))
    .unwrap();
    ns.pods()
        .create(&PostParams::default(), &pod)
        .await
        .unwrap()
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

fn ready(pod: &Pod) -> bool {
    condition(pod, "Ready").as_deref() == Some("True")
}

fn running(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

fn kubectl_logs(ns: &str, pod: &str) -> String {
    let out = Cluster::get()
        .kubectl()
        .args(["logs", "-n", ns, pod])
        .output()
        .expect("kubectl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

#[tokio::test]
async fn the_component_serves_the_pod_ip_and_its_readiness_probe_flips_both_ways() {
    let agent = &node("http-ready").await;
    let [port] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-ready").await;
    let probe = |path: &str| serde_json::json!({"httpGet": {"path": path, "port": "http"}, "periodSeconds": 1, "failureThreshold": 1});
    // The liveness probe runs alongside but must not restart the container by a slow answer on a
    // loaded machine (the 1 s default timeout, one failure): the restart count below is about
    // readiness, which may flip on one slow answer and is waited on both ways.
    let liveness = serde_json::json!({"httpGet": {"path": "/healthz", "port": "http"}, "periodSeconds": 1, "timeoutSeconds": 10, "failureThreshold": 6});
    http_pod(
        &ns,
        agent,
        port,
        "web",
        serde_json::json!({}),
        serde_json::json!({"readinessProbe": probe("/ready"), "livenessProbe": liveness}),
    )
    .await;

    // The readiness probe reaches the Wasm component itself.
    ns.wait_pod(agent, "web", "the pod to become Ready", ready)
        .await;
    let ip = agent.node_ip.as_str();
    assert_eq!(
        get(ip, port, "/").await.unwrap(),
        (200, "hello from http-health\n".into())
    );
    // Each request is an instance with the container's env and volumes.
    assert_eq!(
        get(ip, port, "/env/GREETING").await.unwrap(),
        (200, "hello from the pod spec\n".into())
    );

    assert_eq!(get(ip, port, "/set/unready").await.unwrap().0, 200);
    let pod = ns
        .wait_pod(agent, "web", "the pod to turn not Ready", |p| {
            condition(p, "Ready").as_deref() == Some("False")
        })
        .await;
    assert!(running(&pod), "unready is not dead: {:?}", pod.status);
    assert_eq!(get(ip, port, "/ready").await.unwrap().0, 503);
    assert_eq!(get(ip, port, "/set/ready").await.unwrap().0, 200);
    let pod = ns
        .wait_pod(agent, "web", "the pod to be Ready again", ready)
        .await;
    let restarts = pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .restart_count;
    assert_eq!(restarts, 0, "readiness never restarts");

    // The guest's stdout is the container log, through the API server.
    wait_for(
        "the guest's state changes in kubectl logs",
        TEST_TIMEOUT,
        || async {
            let logs = kubectl_logs(&ns.name, "web");
            (logs.contains("state: unready") && logs.contains("state: ready")).then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nlogs: {}", kubectl_logs(&ns.name, "web")));
}

#[tokio::test]
async fn a_failing_liveness_probe_on_the_component_restarts_it() {
    let agent = &node("http-live").await;
    let [port] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-live").await;
    let probe = serde_json::json!({"httpGet": {"path": "/healthz", "port": port}, "periodSeconds": 1, "failureThreshold": 2});
    http_pod(
        &ns,
        agent,
        port,
        "web",
        serde_json::json!({}),
        serde_json::json!({"livenessProbe": probe}),
    )
    .await;
    ns.wait_pod(agent, "web", "the container to run", running)
        .await;
    let ip = agent.node_ip.clone();
    wait_for("the component to answer", TEST_TIMEOUT, || async {
        get(&ip, port, "/healthz")
            .await
            .ok()
            .filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();
    assert_eq!(get(&ip, port, "/set/unhealthy").await.unwrap().0, 200);
    let pod = ns
        .wait_pod(agent, "web", "a restart after the liveness failure", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .is_some_and(|c| c[0].restart_count >= 1)
        })
        .await;
    // Events are published asynchronously, possibly after the restart is visible.
    ns.wait_events(
        agent,
        "web",
        "the Unhealthy (status 500) and Killing events",
        |events| {
            events.iter().any(|(r, m)| {
                r == "Unhealthy"
                    && m.contains("Liveness probe failed: HTTP probe failed with statuscode: 500")
            }) && events
                .iter()
                .any(|(r, m)| r == "Killing" && m.contains("failed liveness probe"))
        },
    )
    .await;
    assert!(pod
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0]
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .is_some());
    // The restarted container binds its port again (the old listeners were closed) and, told
    // to be healthy (its state survives in the emptyDir), stays up.
    wait_for(
        "the restarted component to answer",
        TEST_TIMEOUT,
        || async {
            get(&ip, port, "/set/healthy")
                .await
                .ok()
                .filter(|(s, _)| *s == 200)
        },
    )
    .await
    .unwrap();
    ns.wait_pod(agent, "web", "the pod to become Ready", |p| {
        condition(p, "Ready").as_deref() == Some("True")
    })
    .await;
}

#[tokio::test]
async fn a_thousand_concurrent_requests_are_all_answered() {
    let agent = &node("http-load").await;
    let [port, port2] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-load").await;
    http_pod(
        &ns,
        agent,
        port,
        "web",
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    // A second pod bounded to 4 requests at once, on its own port.
    http_pod(
        &ns,
        agent,
        port,
        "narrow",
        serde_json::json!({"wasm-kubelet.io/max-concurrent-requests": "4"}),
        serde_json::json!({"ports": [{"containerPort": port2}]}),
    )
    .await;
    ns.wait_pod(agent, "web", "the web pod to run", running)
        .await;
    ns.wait_pod(agent, "narrow", "the narrow pod to run", running)
        .await;
    let ip = agent.node_ip.clone();
    wait_for("the component to answer", TEST_TIMEOUT, || async {
        get(&ip, port, "/").await.ok().filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();

    let burst = |port: u16, path: &'static str, n: usize| {
        let ip = ip.clone();
        async move {
            let tasks: Vec<_> = (0..n)
                .map(|_| {
                    tokio::spawn({
                        let ip = ip.clone();
                        async move { get(&ip, port, path).await }
                    })
                })
                .collect();
            let mut answers = Vec::new();
            for t in tasks {
                answers.push(t.await.unwrap());
            }
            answers
        }
    };
    // Under the default bound (1024), every one of 1000 concurrent requests is served.
    let answers = burst(port, "/sleep?ms=200", 1000).await;
    let failed: Vec<_> = answers
        .iter()
        .filter(|a| !matches!(a, Ok((200, _))))
        .take(5)
        .collect();
    assert!(failed.is_empty(), "all 1000 answered 200; not: {failed:?}");
    assert!(answers
        .iter()
        .all(|a| a.as_ref().is_ok_and(|(_, b)| b == "slept 200 ms\n")));

    // Over a bound of 4, every request still gets an answer: 200, or a 503 that says why.
    let answers = burst(port2, "/sleep?ms=300", 100).await;
    let ok = answers.iter().filter(|a| matches!(a, Ok((200, _)))).count();
    let busy: Vec<&String> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().filter(|(s, _)| *s == 503).map(|(_, b)| b))
        .collect();
    assert_eq!(
        ok + busy.len(),
        100,
        "every request answered: {:?}",
        answers
            .iter()
            .filter(|a| a.is_err())
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(
        ok >= 4 && !busy.is_empty(),
        "{ok} served, {} turned away",
        busy.len()
    );
    assert!(
        busy[0].contains("limit of 4 concurrent requests"),
        "{}",
        busy[0]
    );
}

#[tokio::test]
async fn the_memory_limit_holds_for_all_requests_in_flight_together() {
    let agent = &node("http-mem").await;
    let [port] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-mem").await;
    http_pod(
        &ns,
        agent,
        port,
        "lean",
        serde_json::json!({}),
        serde_json::json!({"resources": {"limits": {"memory": "8Mi"}}}),
    )
    .await;
    ns.wait_pod(agent, "lean", "the pod to run", running).await;
    let ip = agent.node_ip.clone();
    wait_for("the component to answer", TEST_TIMEOUT, || async {
        get(&ip, port, "/").await.ok().filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();
    // Each instance holds a linear memory of more than 1 MiB: 8 MiB cannot hold 100 at once.
    let tasks: Vec<_> = (0..100)
        .map(|_| {
            tokio::spawn({
                let ip = ip.clone();
                async move { get(&ip, port, "/sleep?ms=300").await }
            })
        })
        .collect();
    let mut answers = Vec::new();
    for t in tasks {
        answers.push(t.await.unwrap());
    }
    let ok = answers.iter().filter(|a| matches!(a, Ok((200, _)))).count();
    let busy: Vec<&String> = answers
        .iter()
        .filter_map(|a| a.as_ref().ok().filter(|(s, _)| *s == 503).map(|(_, b)| b))
        .collect();
    assert_eq!(
        ok + busy.len(),
        100,
        "every request answered 200 or 503: {:?}",
        answers
            .iter()
            .filter(|a| !matches!(a, Ok((200 | 503, _))))
            .take(3)
            .collect::<Vec<_>>()
    );
    assert!(
        ok >= 1 && !busy.is_empty(),
        "{ok} served, {} turned away",
        busy.len()
    );
    assert!(
        busy[0].contains("memory limit of 8388608 bytes"),
        "{}",
        busy[0]
    );
    // The container itself lives on: the limit turned requests away, it did not kill it.
    let pod = ns.pods().get("lean").await.unwrap();
    assert!(running(&pod), "{:?}", pod.status);
}

#[tokio::test]
async fn kubectl_port_forward_reaches_the_component() {
    let agent = &node("http-pf").await;
    let [port] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-pf").await;
    http_pod(
        &ns,
        agent,
        port,
        "web",
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "web", "the container to run", running)
        .await;
    let tunnel = PortForward::start(&ns.name, "web", port).await;
    let answer = tokio::time::timeout(
        TEST_TIMEOUT,
        get("127.0.0.1", tunnel.local, "/env/GREETING"),
    )
    .await;
    let stderr = tunnel.stop();
    assert_eq!(
        answer
            .expect("an answer through the tunnel")
            .unwrap_or_else(|e| panic!("{e}; kubectl: {stderr}")),
        (200, "hello from the pod spec\n".into())
    );
}

#[tokio::test]
async fn a_second_pod_on_a_held_port_is_rejected_at_admission() {
    let agent = &node("http-ports").await;
    let [port] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-ports").await;
    http_pod(
        &ns,
        agent,
        port,
        "first",
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "first", "the first pod to run", running)
        .await;
    http_pod(
        &ns,
        agent,
        port,
        "second",
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "second", "the second pod to fail", |p| {
            phase(p) == "Failed"
        })
        .await;
    let status = pod.status.unwrap();
    assert_eq!(status.reason.as_deref(), Some("NodePorts"));
    let message = status.message.unwrap_or_default();
    assert!(
        message.contains(&format!("{port}/TCP is held by pod {}/first", ns.name)),
        "{message}"
    );
    ns.wait_events(agent, "second", "a NodePorts event", |events| {
        events
            .iter()
            .any(|(r, m)| r == "NodePorts" && m.contains("didn't have free ports"))
    })
    .await;
    // The first pod is untouched and still serves.
    assert_eq!(get(&agent.node_ip, port, "/").await.unwrap().0, 200);

    // Once the first pod is gone, its port is free for a new pod.
    ns.pods()
        .delete("first", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the first pod to be gone", TEST_TIMEOUT, || async {
        ns.pods()
            .get_opt("first")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
    .unwrap();
    http_pod(
        &ns,
        agent,
        port,
        "third",
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "third", "the third pod to run", running)
        .await;
}

#[tokio::test]
async fn outbound_hosts_outside_the_allowed_list_are_refused() {
    // The stand-in for "the outside" is on the node's loopback, which pods may not reach unless
    // the node says so.
    let agent = &test_node("http-out", &["--pod-egress-allow-cidrs=127.0.0.1/32"]).await;
    let [port, port2] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-out").await;
    // A plain HTTP server on loopback standing in for "the outside".
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let outside = listener.local_addr().unwrap().port();
    let accepted = std::sync::Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let seen = accepted.clone();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            seen.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
            tokio::spawn(async move {
                // Read the whole request head before answering.
                let mut head = Vec::new();
                let mut buf = [0u8; 2048];
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    match s.read(&mut buf).await {
                        Ok(0) | Err(_) => return,
                        Ok(n) => head.extend_from_slice(&buf[..n]),
                    }
                }
                let _ = s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 8\r\nConnection: close\r\n\r\noutside\n").await;
            });
        }
    });
    let allowed = format!("127.0.0.1:{outside}");
    let policy = serde_json::json!({"wasm-kubelet.io/allowed-outbound-hosts": "127.0.0.1:1"});

    // wasi:http: the component's outgoing request to a host outside its list is denied.
    http_pod(
        &ns,
        agent,
        port,
        "web",
        policy.clone(),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "web", "the container to run", running)
        .await;
    let ip = agent.node_ip.clone();
    wait_for("the component to answer", TEST_TIMEOUT, || async {
        get(&ip, port, "/").await.ok().filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();
    let (status, body) = get(&ip, port, &format!("/fetch?url=http://{allowed}/"))
        .await
        .unwrap();
    assert_eq!(
        (status, body.as_str()),
        (502, "refused: ErrorCode::HttpRequestDenied\n")
    );
    // An open pod may fetch it.
    http_pod(
        &ns,
        agent,
        port,
        "open",
        serde_json::json!({}),
        serde_json::json!({"ports": [{"containerPort": port2}]}),
    )
    .await;
    ns.wait_pod(agent, "open", "the open pod to run", running)
        .await;
    wait_for("the open component to answer", TEST_TIMEOUT, || async {
        get(&ip, port2, "/").await.ok().filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();
    assert_eq!(
        get(&ip, port2, &format!("/fetch?url=http://{allowed}/"))
            .await
            .unwrap(),
        (200, "fetched 200: outside\n".into())
    );
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        1,
        "only the open pod's request left the node"
    );

    // wasi:sockets: a command component's TCP connection, refused and allowed.
    let client = |name: &str, annotations: serde_json::Value| {
        serde_json::from_value::<Pod>(serde_json::json!({
            "metadata": {"name": name, "annotations": annotations},
            "spec": {
                "nodeName": agent.name, "restartPolicy": "Never", "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": "client", "image": example_image("net-client"), "args": [allowed.clone()]}],
            }
        }))
        .unwrap()
    };
    ns.pods()
        .create(&PostParams::default(), &client("denied", policy))
        .await
        .unwrap();
    ns.pods()
        .create(
            &PostParams::default(),
            &client(
                "permitted",
                serde_json::json!({"wasm-kubelet.io/allowed-outbound-hosts": allowed.clone()}),
            ),
        )
        .await
        .unwrap();
    ns.wait_pod(agent, "denied", "the refused client to fail", |p| {
        phase(p) == "Failed"
    })
    .await;
    ns.wait_pod(agent, "permitted", "the allowed client to succeed", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let logs = kubectl_logs(&ns.name, "denied");
    assert!(logs.starts_with("refused: "), "{logs}");
    let logs = kubectl_logs(&ns.name, "permitted");
    assert_eq!(logs.trim(), "connected: HTTP/1.1 200 OK");
    assert_eq!(
        accepted.load(std::sync::atomic::Ordering::SeqCst),
        2,
        "the refused client never reached the listener"
    );
}

#[tokio::test]
async fn deleting_the_pod_drains_requests_in_flight() {
    let agent = &node("http-drain").await;
    let [port] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("http-drain").await;
    http_pod(
        &ns,
        agent,
        port,
        "web",
        serde_json::json!({}),
        serde_json::json!({}),
    )
    .await;
    ns.wait_pod(agent, "web", "the container to run", running)
        .await;
    let ip = agent.node_ip.clone();
    wait_for("the component to answer", TEST_TIMEOUT, || async {
        get(&ip, port, "/").await.ok().filter(|(s, _)| *s == 200)
    })
    .await
    .unwrap();
    // A slow request is in flight when the pod is deleted (grace period 5 s).
    let slow = tokio::spawn({
        let ip = ip.clone();
        async move { get(&ip, port, "/sleep?ms=2000").await }
    });
    wait_for("the slow request to be in flight", TEST_TIMEOUT, || async {
        kubectl_logs(&ns.name, "web")
            .contains("sleeping 2000 ms")
            .then_some(())
    })
    .await
    .unwrap();
    ns.pods()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    assert_eq!(
        slow.await.unwrap().unwrap(),
        (200, "slept 2000 ms\n".into()),
        "the request in flight finished"
    );
    wait_for("the listener to close", TEST_TIMEOUT, || async {
        get(&ip, port, "/").await.is_err().then_some(())
    })
    .await
    .unwrap();
}

#[tokio::test]
async fn a_socket_listener_binds_only_its_declared_port() {
    let agent = &node("tcp-echo").await;
    // One port the first pod declares and listens on; one the second declares, one it asks for.
    let [declared, other_declared, undeclared] = free_ports(&agent.node_ip);
    let ns = TestNamespace::new("tcp-echo").await;
    // `declared` listens on its declared port; `undeclared` asks for a port it does not declare.
    let echo = |name: &str, listen: u16, declared: u16| {
        serde_json::from_value::<Pod>(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": agent.name, "restartPolicy": "Never", "terminationGracePeriodSeconds": 1,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{
                    "name": "echo", "image": example_image("tcp-echo"),
                    "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
                    "args": [format!("$(POD_IP):{listen}")],
                    "ports": [{"containerPort": declared}],
                    "readinessProbe": {"tcpSocket": {"port": declared}, "periodSeconds": 1},
                }],
            }
        }))
        .unwrap()
    };
    ns.pods()
        .create(
            &PostParams::default(),
            &echo("declared", declared, declared),
        )
        .await
        .unwrap();
    ns.pods()
        .create(
            &PostParams::default(),
            &echo("undeclared", undeclared, other_declared),
        )
        .await
        .unwrap();

    // The tcpSocket readiness probe reaches the guest's own listener.
    ns.wait_pod(agent, "declared", "the listener to be Ready", ready)
        .await;
    let mut conn = tokio::net::TcpStream::connect((agent.node_ip.as_str(), declared))
        .await
        .unwrap();
    conn.write_all(b"hello\n").await.unwrap();
    let mut got = vec![0u8; "echo: hello\n".len()];
    tokio::time::timeout(TEST_TIMEOUT, conn.read_exact(&mut got))
        .await
        .expect("an echo")
        .unwrap();
    assert_eq!(got, b"echo: hello\n");

    ns.wait_pod(
        agent,
        "undeclared",
        "the undeclared listener to fail",
        |p| phase(p) == "Failed",
    )
    .await;
    let logs = kubectl_logs(&ns.name, "undeclared");
    assert!(
        logs.starts_with(&format!(
            "cannot listen on {}:{undeclared}: ",
            agent.node_ip
        )),
        "{logs}"
    );
}
