//! The sandbox holds, network part (issue 11): a pod's loopback is its own, and port-forward
//! stays inside the pod. The pod IP is the node IP (a 127.x.y.1 address per test node), so
//! whatever else listens on the node stands in for etcd and the node's daemons: listeners this
//! test owns, answering a secret. A hostile namespace user (port-forward to a port the pod does
//! not serve) and a hostile guest (`net-client` connecting to the node's loopback) must never
//! read it; the pod's own listeners stay reachable. Traffic goes to loopback only.

use std::sync::atomic::Ordering;

use integration_tests::port_forward::{secret_listener, PortForward};
use integration_tests::{
    example_image, phase, test_node, wait_for, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Pod;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

/// The port the `http-health` pods here serve, and the one `tcp-echo` listens on (each test
/// node has an IP of its own, so fixed ports do not collide).
const HTTP_PORT: u16 = 8080;
const ECHO_PORT: u16 = 9000;

fn running(pod: &Pod) -> bool {
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

/// The exit code of container `name` once it has terminated.
fn exit_code(pod: &Pod, name: &str) -> Option<i32> {
    let statuses = pod.status.as_ref()?.container_statuses.as_ref()?;
    statuses
        .iter()
        .find(|c| c.name == name)?
        .state
        .as_ref()?
        .terminated
        .as_ref()
        .map(|t| t.exit_code)
}

fn kubectl_logs(ns: &str, pod: &str, container: &str) -> String {
    let out = Cluster::get()
        .kubectl()
        .args(["logs", "-n", ns, pod, "-c", container])
        .output()
        .expect("kubectl runs");
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn http_health(port: u16) -> serde_json::Value {
    serde_json::json!({"name": "web", "image": example_image("http-health"), "ports": [{"containerPort": port}]})
}

fn net_client(target: &str) -> serde_json::Value {
    serde_json::json!({
        "name": "client", "image": example_image("net-client"), "args": [target],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
    })
}

#[tokio::test]
async fn port_forward_reaches_only_what_the_pod_itself_serves() {
    let agent = &test_node("net-pf", &[]).await;
    let ns = TestNamespace::new("net-pf").await;
    // Another process of the node holds a port at the pod IP (the node IP), as etcd holds 2379.
    const SECRET: &str = "etcd-keys-the-pod-must-not-see";
    let (held, accepted) = secret_listener(&agent.node_ip, SECRET).await;

    // A pod that declares the held port but does not (cannot) serve it, and one that does not
    // declare it at all.
    let ticker = |ports: serde_json::Value| serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "ticker", "image": example_image("ticker"), "ports": ports}]});
    ns.create_bound_pod(
        agent,
        "declares",
        serde_json::json!({}),
        ticker(serde_json::json!([{"containerPort": held}])),
    )
    .await;
    ns.create_bound_pod(
        agent,
        "undeclared",
        serde_json::json!({}),
        ticker(serde_json::json!([])),
    )
    .await;
    for pod in ["declares", "undeclared"] {
        ns.wait_pod(agent, pod, "the ticker to run", running).await;
        let forward = PortForward::start(&ns.name, pod, held).await;
        let got = forward.exchange(b"GET / HTTP/1.1\r\nHost: x\r\n\r\n").await;
        let stderr = forward.stop();
        assert!(
            !got.contains(SECRET),
            "port-forward to {pod}:{held} read another process's listener: {got:?}"
        );
        assert!(
            stderr.contains(&format!(
                "failed to connect to localhost:{held} inside namespace"
            )),
            "kubectl says why ({pod}): {stderr}"
        );
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "nothing was ever dialled at the held port"
    );

    // The pod's own listeners still work: an HTTP component (the agent's server for it) and a
    // wasi:sockets guest's listener.
    ns.create_bound_pod(
        agent,
        "web",
        serde_json::json!({}),
        serde_json::json!({"restartPolicy": "Always", "containers": [http_health(HTTP_PORT)]}),
    )
    .await;
    let echo = serde_json::json!({
        "name": "echo", "image": example_image("tcp-echo"), "args": [format!("$(POD_IP):{ECHO_PORT}")],
        "ports": [{"containerPort": ECHO_PORT}],
        "env": [{"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}}],
    });
    ns.create_bound_pod(
        agent,
        "echo",
        serde_json::json!({}),
        serde_json::json!({"restartPolicy": "Always", "containers": [echo]}),
    )
    .await;
    ns.wait_pod(agent, "web", "the component to run", running)
        .await;
    let forward = PortForward::start(&ns.name, "web", HTTP_PORT).await;
    let got = forward
        .exchange(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
        .await;
    let stderr = forward.stop();
    assert!(
        got.starts_with("HTTP/1.1 200"),
        "the component answers through the tunnel: {got:?}; kubectl: {stderr}"
    );
    ns.wait_pod(agent, "echo", "the echo guest to run", running)
        .await;
    wait_for("the echo guest to listen", TEST_TIMEOUT, || async {
        kubectl_logs(&ns.name, "echo", "echo")
            .contains("listening on")
            .then_some(())
    })
    .await
    .unwrap();
    let forward = PortForward::start(&ns.name, "echo", ECHO_PORT).await;
    let got = forward
        .read_until(b"through the tunnel\n", "echo: through the tunnel")
        .await;
    let stderr = forward.stop();
    assert!(
        got.contains("echo: through the tunnel"),
        "the guest's own listener answers: {got:?}; kubectl: {stderr}"
    );
}

#[tokio::test]
async fn guests_reach_only_their_own_pods_listeners_on_loopback() {
    let agent = &test_node("net-guest", &[]).await;
    let ns = TestNamespace::new("net-guest").await;
    // A node daemon on the node's loopback (as etcd on 127.0.0.1:2379), and one at the node IP.
    const SECRET: &str = "node-daemon";
    let (daemon, accepted) = secret_listener("127.0.0.1", SECRET).await;
    let (at_node_ip, accepted_at_node_ip) = secret_listener(&agent.node_ip, SECRET).await;
    for (name, target) in [
        ("loopback", format!("127.0.0.1:{daemon}")),
        ("nodeip", format!("$(POD_IP):{at_node_ip}")),
    ] {
        ns.create_bound_pod(
            agent,
            name,
            serde_json::json!({}),
            serde_json::json!({"containers": [net_client(&target)]}),
        )
        .await;
        let pod = ns
            .wait_pod(agent, name, "the client to finish", |p| {
                matches!(phase(p), "Succeeded" | "Failed")
            })
            .await;
        let logs = kubectl_logs(&ns.name, name, "client");
        // Refused by the policy (access denied), not merely by a closed port.
        assert!(
            logs.starts_with("refused: ") && logs.contains("ermission denied"),
            "a guest connected to another process on the node's loopback ({target}): {logs}"
        );
        assert_eq!(phase(&pod), "Failed");
    }
    assert_eq!(
        accepted.load(Ordering::SeqCst) + accepted_at_node_ip.load(Ordering::SeqCst),
        0,
        "no connection reached the node's daemons"
    );

    // Its own pod's listener, on the same loopback: reached. The client waits for the component
    // (OnFailure restarts it until the server is up).
    ns.create_bound_pod(agent, "own", serde_json::json!({}), serde_json::json!({"restartPolicy": "OnFailure", "containers": [http_health(HTTP_PORT), net_client(&format!("$(POD_IP):{HTTP_PORT}"))]})).await;
    ns.wait_pod(agent, "own", "the client to connect to its own pod", |p| {
        exit_code(p, "client") == Some(0)
    })
    .await;
    assert_eq!(
        kubectl_logs(&ns.name, "own", "client").trim(),
        "connected: HTTP/1.1 200 OK"
    );
}

#[tokio::test]
async fn the_nodes_deny_list_holds_even_for_the_pods_own_address() {
    // Loopback is all these tests may reach: deny all of it. The same pod as in the test above,
    // whose client connects to its own component, is now refused.
    let agent = &test_node("net-deny", &["--pod-egress-deny-cidrs=127.0.0.0/8"]).await;
    let ns = TestNamespace::new("net-deny").await;
    ns.create_bound_pod(agent, "own", serde_json::json!({}), serde_json::json!({"restartPolicy": "Never", "containers": [http_health(HTTP_PORT), net_client(&format!("$(POD_IP):{HTTP_PORT}"))]})).await;
    let pod = ns
        .wait_pod(agent, "own", "the client to finish", |p| {
            exit_code(p, "client").is_some()
        })
        .await;
    let logs = kubectl_logs(&ns.name, "own", "client");
    assert!(
        logs.starts_with("refused: ") && logs.contains("ermission denied"),
        "refused by the policy, not by a closed port: {logs}"
    );
    assert_eq!(exit_code(&pod, "client"), Some(1));
    // The component itself serves (the deny list is about what pods reach, not who reaches them).
    let ip = agent.node_ip.clone();
    let answered = wait_for("the component to answer the test", TEST_TIMEOUT, || async {
        let mut s = tokio::net::TcpStream::connect((ip.as_str(), HTTP_PORT))
            .await
            .ok()?;
        s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            .await
            .ok()?;
        let mut got = Vec::new();
        s.read_to_end(&mut got).await.ok()?;
        String::from_utf8_lossy(&got)
            .starts_with("HTTP/1.1 200")
            .then_some(())
    })
    .await;
    assert!(answered.is_ok());
}
