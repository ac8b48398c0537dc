//! A mixed node: `--container-runtime-endpoint` (the local cluster's containerd) and a pod
//! CIDR of the test's own. A busybox pod (real containerd, runc and CNI plugins) and a Wasm pod
//! run side by side on it; the container pod has its own IP on the node's bridge, which the
//! test (on the node) reaches; deleting the pod removes its network namespace and veth.
//!
//! Network safety: the pod CIDR is a /24 in 10.0.0.0/8 no route of this host covers; the node
//! writes a conflist that does not route (no isGateway, no default route, no masquerading), so
//! `net.ipv4.ip_forward` stays as it was (checked); the only traffic is from the test to the
//! pod's address in the namespace the agent made. The bridge is deleted at the end.

use std::path::{Path, PathBuf};
use std::process::Command;

use integration_tests::{
    example_image, has_taint, http_get, phase, push_examples, unique_name, wait_for,
    workspace_root, Agent, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Node, Pod};

/// The taint a Wasm-only node registers with (node_status.rs).
const WASM_ONLY_TAINT: &str = "wasm-kubelet.io/runtime";

/// A /24 in 10.0.0.0/8 that no route of this host covers (so the test's bridge takes nothing
/// from the machine's own network), different for each call.
fn free_pod_cidr() -> String {
    let routes = String::from_utf8(
        Command::new("ip")
            .args(["-4", "route", "show", "table", "all"])
            .output()
            .expect("ip route")
            .stdout,
    )
    .unwrap_or_default();
    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .expect("urandom");
    for i in 0..512u32 {
        let n = u64::from_le_bytes(seed).wrapping_add(u64::from(i) * 7919);
        // 10.100.0.0 - 10.227.255.0: away from the ranges clusters commonly use.
        let (b, c) = (100 + (n % 128) as u8, ((n >> 8) % 256) as u8);
        let prefix = format!("10.{b}.{c}.");
        if !routes.contains(&prefix) && !routes.contains(&format!("10.{b}.0.0/16")) {
            return format!("10.{b}.{c}.0/24");
        }
    }
    panic!("no free /24 in 10.0.0.0/8:\n{routes}");
}

fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("ip_forward")
        .trim()
        .to_string()
}

fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

/// What the node leaves on the host when the test ends, passed or not (the agent is killed
/// with SIGKILL, and pods outlive agents): the containers, images and namespace in containerd
/// (with `ctr`), and the bridge.
struct Leftovers {
    socket: String,
    namespace: String,
    /// The node's root dir: the bridge is the one its conflist names, if it got that far.
    root: PathBuf,
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .args(["--address", &self.socket, "-n", &self.namespace])
                .args(args)
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for id in ctr(&["tasks", "list", "-q"]).lines() {
            ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            ctr(&["tasks", "delete", "-f", id]);
        }
        for id in ctr(&["containers", "list", "-q"]).lines() {
            ctr(&["containers", "delete", id]);
            ctr(&["snapshots", "delete", id]);
        }
        // Leases first: the images' synchronous delete then collects everything.
        for lease in ctr(&["leases", "list", "-q"]).lines() {
            ctr(&["leases", "delete", lease]);
        }
        for image in ctr(&["images", "list", "-q"]).lines() {
            ctr(&["images", "delete", "--sync", image]);
        }
        if let Some(bridge) = conflist_of(&self.root)
            .and_then(|list| list["plugins"][0]["bridge"].as_str().map(str::to_string))
        {
            let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        }
        // containerd refuses to delete a namespace until its garbage collection has freed the
        // snapshots and content just released: poll it (cleanup only, at most 10 s).
        let mut last = String::new();
        for _ in 0..100 {
            let Ok(out) = Command::new("ctr")
                .args(["--address", &self.socket, "namespaces", "remove"])
                .arg(&self.namespace)
                .output()
            else {
                return;
            };
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() || last.contains("not found") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!(
            "containerd namespace {} left behind: {last}",
            self.namespace
        );
    }
}

fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

/// The conflist the node wrote under its root, if any.
fn conflist_of(root: &Path) -> Option<serde_json::Value> {
    let file = std::fs::read_dir(root.join("pod-network/cni/net.d"))
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "conflist"))?
        .path();
    serde_json::from_slice(&std::fs::read(file).ok()?).ok()
}

/// The bridge named in the conflist the node wrote under its root.
fn bridge_of(root: &Path) -> String {
    let list = conflist_of(root).expect("the node wrote its conflist");
    let bridge = &list["plugins"][0];
    // The network the node writes by default never routes (the module docs).
    assert_eq!(bridge["isGateway"], false, "{list}");
    assert_eq!(bridge["ipMasq"], false, "{list}");
    assert!(bridge["ipam"].get("routes").is_none(), "{list}");
    bridge["bridge"].as_str().expect("bridge name").to_string()
}

/// The pod's host-side veth, from the attachment record the node keeps while it is attached.
fn veth_of(root: &Path, uid: &str) -> String {
    let record: PathBuf = root
        .join("pod-network/cni/attachments")
        .join(format!("{uid}.json"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("attachment record")).expect("json");
    record["result"]["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .find(|name| name.starts_with("veth"))
        .expect("a host veth in the CNI result")
        .to_string()
}

#[tokio::test]
async fn a_container_pod_and_a_wasm_pod_on_one_mixed_node() {
    let cluster = Cluster::get();
    let forward_before = ip_forward();
    let socket = cluster.var("LC_CONTAINERD_SOCKET").to_string();
    let cidr = free_pod_cidr();
    // A /24: its addresses share the first three octets.
    let net_prefix = cidr.trim_end_matches("0/24").to_string();
    let endpoint = format!("--container-runtime-endpoint=unix://{socket}");
    let pod_cidr = format!("--pod-cidr={cidr}");
    // The node's name and root are known before it starts, so what it leaves is cleaned up
    // even when it never registers.
    push_examples();
    let name = unique_name("mixed");
    let dir = workspace_root().join("target/it").join(&name);
    let logs = format!("--pod-logs-dir={}", dir.join("logs").display());
    let _leftovers = Leftovers {
        socket: socket.clone(),
        namespace: format!("wasm-kubelet-{name}"),
        root: dir.join("root"),
    };
    let agent = &Agent::start(&name, &[&logs, &endpoint, &pod_cidr]).expect("the agent starts");
    let nodes: kube::Api<Node> = kube::Api::all(cluster.admin().await);
    wait_for("the node to register", TEST_TIMEOUT, || async {
        nodes.get_opt(&agent.name).await.ok()?
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let root = agent.dir.join("root");
    bridge_of(&root);

    // Registration: no Wasm-only taint, both runtimes named.
    let node = wait_for("the node's nodeInfo", TEST_TIMEOUT, || async {
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
    let version = node
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
        !has_taint(&node, WASM_ONLY_TAINT),
        "a mixed node has no Wasm-only taint: {:?}",
        node.spec
    );

    let ns = TestNamespace::new("mixed").await;
    let busybox = format!("{}/busybox:1", cluster.var("REGISTRY"));
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
