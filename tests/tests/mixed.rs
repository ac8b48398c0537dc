//! A mixed node: `--container-runtime-endpoint` (the local cluster's containerd) and a pod
//! CIDR of the test's own. A busybox pod (real containerd, runc and CNI plugins) and a Wasm pod
//! run side by side on it; the container pod has its own IP on the node's bridge, which the
//! test (on the node) reaches; deleting the pod removes its network namespace and veth.
//!
//! Network safety: the pod CIDR is a /24 in 10.0.0.0/8 no route of this host covers; the node
//! writes a conflist that does not route (no isGateway, no default route, no masquerading), so
//! `net.ipv4.ip_forward` stays as it was (checked); the only traffic is from the test to the
//! pod's address in the namespace the agent made. The bridge is deleted at the end.

use integration_tests::mixed_node::{
    bridge_of, ip_forward, link_exists, pod_ip, veth_of, MixedNode,
};
use integration_tests::{
    example_image, has_taint, http_get, phase, wait_for, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Node;

/// The taint a Wasm-only node registers with (node_status.rs).
const WASM_ONLY_TAINT: &str = "wasm-kubelet.io/runtime";

#[tokio::test]
async fn a_container_pod_and_a_wasm_pod_on_one_mixed_node() {
    let cluster = Cluster::get();
    let forward_before = ip_forward();
    let node = MixedNode::start("mixed", &[]).await;
    let agent = &node.agent;
    let cidr = node.cidr.clone();
    // A /24: its addresses share the first three octets.
    let net_prefix = cidr.trim_end_matches("0/24").to_string();
    let nodes: kube::Api<Node> = kube::Api::all(cluster.admin().await);
    let root = agent.dir.join("root");
    bridge_of(&root);

    // Registration: no Wasm-only taint, both runtimes named.
    let registered = wait_for("the node's nodeInfo", TEST_TIMEOUT, || async {
        let node = nodes.get_opt(&agent.name).await.ok()??;
        let version = node
            .status
            .as_ref()?
            .node_info
            .as_ref()?
            .container_runtime_version
            .clone();
        (!version.is_empty()).then_some(node)
    })
    .await
    .expect("node status");
    let version = registered
        .status
        .as_ref()
        .and_then(|s| s.node_info.as_ref())
        .map(|i| i.container_runtime_version.clone())
        .unwrap_or_default();
    assert!(
        version.contains("containerd://") && version.contains("wasmtime://"),
        "containerRuntimeVersion {version:?}"
    );
    assert!(
        !has_taint(&registered, WASM_ONLY_TAINT),
        "a mixed node has no Wasm-only taint: {:?}",
        registered.spec
    );

    let ns = TestNamespace::new("mixed").await;
    let busybox = MixedNode::busybox();
    let created = ns
        .create_bound_pod(
            agent,
            "box",
            serde_json::json!({}),
            serde_json::json!({
                "containers": [{
                    "name": "web",
                    "image": busybox,
                    "command": ["sh", "-c", "echo hi; exec httpd -f -p 8080"],
                }],
            }),
        )
        .await;
    let uid = created.metadata.uid.clone().expect("uid");
    ns.create_bound_pod(
        agent,
        "wasm",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "app", "image": example_image("ticker")}]}),
    )
    .await;
    let boxed = ns
        .wait_pod(agent, "box", "the container pod Running with its IP", |p| {
            phase(p) == "Running" && pod_ip(p).is_some_and(|ip| ip != agent.node_ip)
        })
        .await;
    let wasm = ns
        .wait_pod(agent, "wasm", "the Wasm pod Running", |p| {
            phase(p) == "Running"
        })
        .await;
    assert_eq!(
        pod_ip(&wasm).as_deref(),
        Some(agent.node_ip.as_str()),
        "a Wasm pod keeps the node's IP"
    );
    let ip: std::net::Ipv4Addr = pod_ip(&boxed).unwrap().parse().expect("an IPv4 pod IP");
    assert!(
        ip.to_string().starts_with(&net_prefix),
        "pod IP {ip} not in {cidr}"
    );
    let pod_ips: Vec<String> = boxed
        .status
        .as_ref()
        .and_then(|s| s.pod_ips.clone())
        .unwrap_or_default()
        .into_iter()
        .map(|p| p.ip)
        .collect();
    assert_eq!(pod_ips, [ip.to_string()]);
    let container_id = boxed
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .and_then(|c| c.container_id.clone())
        .unwrap_or_default();
    assert!(
        container_id.starts_with("containerd://"),
        "{container_id:?}"
    );

    // The node (this test, on it) reaches the pod on its own IP.
    let ip_text = ip.to_string();
    let (status, _) = wait_for("httpd in the pod to answer", TEST_TIMEOUT, || {
        let ip_text = ip_text.clone();
        async move { http_get(&ip_text, 8080, "/").await.ok() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert!(status == 200 || status == 404, "HTTP {status}");

    let logs = cluster
        .kubectl()
        .args(["logs", "-n", &ns.name, "box"])
        .output()
        .expect("kubectl logs");
    assert!(
        String::from_utf8_lossy(&logs.stdout).contains("hi"),
        "kubectl logs: {}{}",
        String::from_utf8_lossy(&logs.stdout),
        String::from_utf8_lossy(&logs.stderr)
    );

    // Deleting the pod: CNI DEL (veth and address released), the namespaces unpinned.
    let veth = veth_of(&root, &uid);
    assert!(link_exists(&veth), "veth {veth} while the pod runs");
    let ns_dir = root.join("pod-network/namespaces").join(&uid);
    assert!(ns_dir.join("ns/net").exists(), "{}", ns_dir.display());
    ns.pods()
        .delete("box", &Default::default())
        .await
        .expect("delete");
    let pods = ns.pods();
    wait_for("the container pod to go", TEST_TIMEOUT, || async {
        pods.get_opt("box")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    wait_for("the pod's netns and veth to go", TEST_TIMEOUT, || async {
        (!link_exists(&veth) && !ns_dir.exists()).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert!(!root
        .join("pod-network/cni/attachments")
        .join(format!("{uid}.json"))
        .exists());

    ns.pods()
        .delete("wasm", &Default::default())
        .await
        .expect("delete");
    wait_for("the Wasm pod to go", TEST_TIMEOUT, || async {
        pods.get_opt("wasm")
            .await
            .ok()
            .and_then(|p| p.is_none().then_some(()))
    })
    .await
    .expect("the Wasm pod is deleted");
    assert_eq!(
        ip_forward(),
        forward_before,
        "IP forwarding must not change"
    );
}

/// A Wasm pod's declared ports are the node's (its IP is the node's); a container pod's are its
/// own, on its own IP: the two serve the same port side by side, and only a second pod on the
/// node's network is refused the port.
#[tokio::test]
async fn a_container_pod_port_is_its_own_and_a_wasm_pod_port_is_the_nodes() {
    let node = MixedNode::start("mixed-ports", &[]).await;
    let agent = &node.agent;
    let ns = TestNamespace::new("mixed-ports").await;
    let wasm_spec = serde_json::json!({
        "containers": [{
            "name": "app",
            "image": example_image("ticker"),
            "ports": [{"containerPort": 18080}],
        }],
    });
    ns.create_bound_pod(agent, "wasm", serde_json::json!({}), wasm_spec.clone())
        .await;
    ns.wait_pod(agent, "wasm", "the Wasm pod Running", |p| {
        phase(p) == "Running"
    })
    .await;
    ns.create_bound_pod(
        agent,
        "box",
        serde_json::json!({}),
        serde_json::json!({
            "containers": [{
                "name": "web",
                "image": MixedNode::busybox(),
                "command": ["sh", "-c", "echo served > /tmp/index.html; exec httpd -f -p 18080 -h /tmp"],
                "ports": [{"containerPort": 18080}],
            }],
        }),
    )
    .await;
    let boxed = ns
        .wait_pod(
            agent,
            "box",
            "the container pod Running on its own IP",
            |p| {
                phase(p) == "Failed"
                    || (phase(p) == "Running" && pod_ip(p).is_some_and(|ip| ip != agent.node_ip))
            },
        )
        .await;
    assert_eq!(
        phase(&boxed),
        "Running",
        "the container pod's port is not the node's: {:?}",
        boxed.status
    );
    let ip = pod_ip(&boxed).unwrap();
    let (status, body) = wait_for("httpd in the container pod", TEST_TIMEOUT, || {
        let ip = ip.clone();
        async move { http_get(&ip, 18080, "/index.html").await.ok() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert_eq!(status, 200);
    assert!(body.contains("served"), "{body}");

    // A second pod on the node's network asking for the port is refused it, naming the holder.
    ns.create_bound_pod(agent, "wasm2", serde_json::json!({}), wasm_spec)
        .await;
    let refused = ns
        .wait_pod(agent, "wasm2", "the second Wasm pod refused", |p| {
            phase(p) == "Failed"
        })
        .await;
    let status = refused.status.unwrap_or_default();
    assert_eq!(status.reason.as_deref(), Some("NodePorts"), "{status:?}");
    assert!(status
        .message
        .unwrap_or_default()
        .contains(&format!("held by pod {}/wasm", ns.name)));

    // A hostPort on a container pod is not mapped on this node: refused, saying so, rather
    // than left silently unreachable.
    ns.create_bound_pod(
        agent,
        "mapped",
        serde_json::json!({}),
        serde_json::json!({
            "containers": [{
                "name": "web",
                "image": MixedNode::busybox(),
                "command": ["sleep", "3600"],
                "ports": [{"containerPort": 80, "hostPort": 18081}],
            }],
        }),
    )
    .await;
    let refused = ns
        .wait_pod(agent, "mapped", "the hostPort pod refused", |p| {
            phase(p) == "Failed"
        })
        .await;
    let message = refused.status.and_then(|s| s.message).unwrap_or_default();
    assert!(
        message.contains("hostPort 18081 is not supported"),
        "{message}"
    );
}
