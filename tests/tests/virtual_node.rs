//! deploy/virtual-node as a cluster admin uses it: the agent image built by `build-image` from
//! the debug binary and pushed to the local registry, a bootstrap token from `make-bootstrap`,
//! the manifests applied with the real `kubectl apply -k` (through an overlay naming the image,
//! a namespace and a suffix of the run's own). The agent runs AS A POD (two containers: agent
//! and Wasm runtime) on a mixed node (containerd), joins with the token (its CSR approved by the
//! controller manager), registers a node named after its pod at the pod's IP (downward API),
//! and a Wasm pod the scheduler places on that node runs; its log is read from the virtual
//! node's kubelet API. The agent pod is then deleted: the StatefulSet's new pod is the same
//! node (certificate from the state volume, no second CSR) and runs the Wasm pod again.
//!
//! Network safety: the cluster listens on 127.0.0.1; the agent pod reaches it through
//! [`NetnsRelay`] (loopback inside the pod's namespace to loopback on the host). The test
//! reaches the agent pod's kubelet API at its address in the mixed node's non-routing pod CIDR.

use std::path::Path;
use std::time::Duration;

use integration_tests::mixed_node::{pod_ip, MixedNode};
use integration_tests::virtual_node::{build_agent_image, Deployment, NetnsRelay};
use integration_tests::{
    admin_cert, node_condition, phase, wait_for, Cluster, TestNamespace, TEST_EVICTION_HARD,
};
use k8s_openapi::api::certificates::v1::CertificateSigningRequest;
use k8s_openapi::api::core::v1::{Node, PersistentVolume, Pod};
use kube::api::{DeleteParams, PostParams};
use kube::Api;

/// Pulling the ~30 MB agent image into containerd and a first crash-loop backoff (the agent
/// may start before the relay is up) fit well within this.
const JOIN_TIMEOUT: Duration = Duration::from_secs(150);

fn port_of(url: &str) -> u16 {
    url.rsplit(':')
        .next()
        .and_then(|p| p.trim_end_matches('/').parse().ok())
        .unwrap_or_else(|| panic!("no port in {url}"))
}

/// The node's InternalIP.
fn internal_ip(node: &Node) -> Option<String> {
    node.status
        .as_ref()?
        .addresses
        .as_ref()?
        .iter()
        .find(|a| a.type_ == "InternalIP")
        .map(|a| a.address.clone())
}

/// CSRs made with bootstrap token `id`.
async fn bootstrap_csrs(
    csrs: &Api<CertificateSigningRequest>,
    id: &str,
) -> Vec<CertificateSigningRequest> {
    let user = format!("system:bootstrap:{id}");
    csrs.list(&Default::default())
        .await
        .expect("list CSRs")
        .items
        .into_iter()
        .filter(|c| c.spec.username.as_deref() == Some(user.as_str()))
        .collect()
}

/// The agent pod once it has a network namespace, other than `not_uid`; with a relay into it
/// for the API server's and the registry's ports.
async fn agent_pod_with_relay(
    pods: &Api<Pod>,
    name: &str,
    not_uid: Option<&str>,
    host_root: &Path,
    ports: &[u16],
) -> (Pod, NetnsRelay) {
    let pod = wait_for(
        "the agent pod's network namespace",
        JOIN_TIMEOUT,
        || async {
            let pod = pods.get_opt(name).await.ok()??;
            let uid = pod.metadata.uid.clone()?;
            (Some(uid.as_str()) != not_uid
                && host_root
                    .join("pod-network/namespaces")
                    .join(&uid)
                    .join("ns/net")
                    .exists())
            .then_some(pod)
        },
    )
    .await;
    let pod = match pod {
        Ok(pod) => pod,
        Err(e) => panic!("{e}: {}", pods_status(pods, name).await),
    };
    let uid = pod.metadata.uid.clone().unwrap();
    let netns = host_root
        .join("pod-network/namespaces")
        .join(&uid)
        .join("ns/net");
    let relay = NetnsRelay::start(&netns, ports).expect("relay into the agent pod");
    (pod, relay)
}

async fn pods_status(pods: &Api<Pod>, name: &str) -> String {
    format!(
        "{:#?}",
        pods.get_opt(name)
            .await
            .ok()
            .flatten()
            .and_then(|p| p.status)
    )
}

/// The agent pod's container logs, as the mixed node wrote them.
fn agent_pod_logs(host: &MixedNode) -> String {
    let mut out = String::new();
    let Ok(pods) = std::fs::read_dir(host.agent.dir.join("logs")) else {
        return out;
    };
    for pod in pods.flatten() {
        for container in ["agent", "runtime"] {
            let Ok(files) = std::fs::read_dir(pod.path().join(container)) else {
                continue;
            };
            for file in files.flatten() {
                let text = std::fs::read_to_string(file.path()).unwrap_or_default();
                let tail: Vec<&str> = text.lines().rev().take(25).collect();
                out += &format!("--- {}\n", file.path().display());
                for line in tail.into_iter().rev() {
                    out += line;
                    out.push('\n');
                }
            }
        }
    }
    out
}

/// `GET path` on the kubelet API at `ip`:10250 with the admin's client certificate (curl, off
/// the runtime's threads: the agent asks the API server, through the relay, to authorize it).
async fn kubelet_get_at(ip: &str, path: &str) -> (u16, String) {
    let (ip, path) = (ip.to_string(), path.to_string());
    tokio::task::spawn_blocking(move || kubelet_get_blocking(&ip, &path))
        .await
        .expect("curl thread")
}

fn kubelet_get_blocking(ip: &str, path: &str) -> (u16, String) {
    let (crt, key) = admin_cert();
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}", "--cert"])
        .arg(crt)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{ip}:10250{path}"))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// Force-deletes the pods of a namespace at the end, passed or not: their node (the virtual
/// node) goes with the test, and a pod left on it would hold its namespace in Terminating.
struct ForceDeletePods(String);

impl Drop for ForceDeletePods {
    fn drop(&mut self) {
        let _ = Cluster::get()
            .kubectl()
            .args([
                "delete",
                "pods",
                "--all",
                "--grace-period=0",
                "--force",
                "-n",
                &self.0,
            ])
            .output();
    }
}

/// Deletes the virtual Node and the state PersistentVolume at the end, passed or not.
struct ClusterLeftovers {
    node: String,
    pv: String,
}

impl Drop for ClusterLeftovers {
    fn drop(&mut self) {
        let cluster = Cluster::get();
        for (kind, name) in [("node", &self.node), ("pv", &self.pv)] {
            let _ = cluster
                .kubectl()
                .args(["delete", kind, name, "--ignore-not-found", "--wait=false"])
                .output();
        }
    }
}

// Multi-threaded: the relay's tasks carry the agent's API requests while the test waits.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_agent_as_a_pod_joins_by_token_runs_wasm_pods_and_keeps_its_identity() {
    let cluster = Cluster::get();
    let client = cluster.admin().await;
    let run = format!("t{}", std::process::id());
    let (image, layer_bytes) = build_agent_image(&run);
    eprintln!("agent image {image}: layer {layer_bytes} bytes compressed");

    let host = MixedNode::start("vnhost", &[]).await;
    let registry = cluster.var("REGISTRY");
    let ports = [port_of(cluster.var("APISERVER")), port_of(registry)];
    let vnode = format!("wasm-kubelet-{run}-0");
    let namespace = format!("vn-{run}");

    // The StatefulSet's state volume: a hostPath PersistentVolume bound ahead to the claim the
    // StatefulSet makes for pod 0 (the local cluster has no dynamic provisioner).
    let state = host.agent.dir.join("vnode-state");
    std::fs::create_dir_all(&state).unwrap();
    let pv_name = format!("vn-state-{run}");
    let _leftovers = ClusterLeftovers {
        node: vnode.clone(),
        pv: pv_name.clone(),
    };
    let pv: PersistentVolume = serde_json::from_value(serde_json::json!({
        "metadata": {"name": pv_name},
        "spec": {
            "capacity": {"storage": "2Gi"},
            "accessModes": ["ReadWriteOnce"],
            "persistentVolumeReclaimPolicy": "Retain",
            "hostPath": {"path": state.display().to_string(), "type": "Directory"},
            "claimRef": {"namespace": namespace, "name": format!("state-wasm-kubelet-{run}-0")},
        },
    }))
    .unwrap();
    Api::<PersistentVolume>::all(client.clone())
        .create(&PostParams::default(), &pv)
        .await
        .expect("create the state PV");

    // The test's overlay: on the mixed node, the local plain-http registry named insecure, the
    // test agents' eviction thresholds (a nearly full build disk is no pressure).
    let insecure = format!("--insecure-registries={registry}");
    let patches = serde_json::json!([
        {"op": "add", "path": "/spec/template/spec/nodeSelector",
         "value": {"kubernetes.io/hostname": host.agent.name}},
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": insecure},
        {"op": "add", "path": "/spec/template/spec/containers/1/args/-", "value": insecure},
        {"op": "add", "path": "/spec/template/spec/containers/0/args/-", "value": TEST_EVICTION_HARD},
    ]);
    let deployment = Deployment::apply(&host.agent.dir.join("overlay"), &run, &image, &patches);
    assert_eq!(deployment.namespace, namespace);

    let pods: Api<Pod> = Api::namespaced(client.clone(), &namespace);
    let nodes: Api<Node> = Api::all(client.clone());
    let csrs: Api<CertificateSigningRequest> = Api::all(client.clone());
    let (agent_pod, relay) = agent_pod_with_relay(&pods, &vnode, None, &host.root(), &ports).await;
    let first_uid = agent_pod.metadata.uid.clone().unwrap();

    // It joins: a node named after the pod, Ready, at the pod's IP.
    let node = wait_for("the virtual node Ready", JOIN_TIMEOUT, || async {
        let node = nodes.get_opt(&vnode).await.ok()??;
        (node_condition(&node, "Ready").as_deref() == Some("True")).then_some(node)
    })
    .await;
    let node = match node {
        Ok(node) => node,
        Err(e) => panic!(
            "{e}\nagent pod: {}\nagent pod logs:\n{}\nmixed node log:\n{}",
            pods_status(&pods, &vnode).await,
            agent_pod_logs(&host),
            host.agent.log_tail()
        ),
    };
    let agent_pod = pods.get(&vnode).await.unwrap();
    let agent_ip = pod_ip(&agent_pod).expect("the agent pod's IP");
    assert_ne!(agent_ip, host.agent.node_ip, "the agent pod has its own IP");
    assert_eq!(
        internal_ip(&node).as_deref(),
        Some(agent_ip.as_str()),
        "the node's InternalIP is the agent pod's IP (status.podIP)"
    );
    assert_eq!(
        node.metadata
            .labels
            .as_ref()
            .and_then(|l| l.get("wasm-kubelet.io/runtime"))
            .map(String::as_str),
        Some("wasm")
    );

    // By the bootstrap token's one CSR, approved and signed by the controller manager.
    let made = bootstrap_csrs(&csrs, &deployment.token_id).await;
    assert_eq!(made.len(), 1, "one bootstrap CSR: {made:#?}");
    let csr = &made[0];
    assert_eq!(
        csr.spec.signer_name,
        "kubernetes.io/kube-apiserver-client-kubelet"
    );
    let status = csr.status.as_ref().expect("CSR status");
    assert!(
        status
            .conditions
            .iter()
            .flatten()
            .any(|c| c.type_ == "Approved" && c.status == "True"),
        "approved without a person: {status:?}"
    );
    assert!(status.certificate.is_some(), "signed");
    assert!(state.join("kubeconfig").exists() && state.join("pki").exists());

    // A Wasm pod placed by the scheduler through the deployment's RuntimeClass.
    let apps = TestNamespace::new("vnwasm").await;
    let _apps_pods = ForceDeletePods(apps.name.clone());
    let wasm: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ticker"},
        "spec": {
            "runtimeClassName": deployment.name("wasm"),
            // Other tests' Wasm nodes carry the RuntimeClass's label too: this one.
            "nodeSelector": {"kubernetes.io/hostname": vnode},
            "terminationGracePeriodSeconds": 1,
            "containers": [{"name": "app", "image": integration_tests::example_image("ticker")}],
        },
    }))
    .unwrap();
    apps.pods()
        .create(&PostParams::default(), &wasm)
        .await
        .expect("create the Wasm pod");
    let running = wait_for(
        "the Wasm pod Running on the virtual node",
        JOIN_TIMEOUT,
        || async {
            let pod = apps.pods().get_opt("ticker").await.ok()??;
            (phase(&pod) == "Running").then_some(pod)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent pod logs:\n{}", agent_pod_logs(&host)));
    assert_eq!(
        running.spec.as_ref().and_then(|s| s.node_name.as_deref()),
        Some(vnode.as_str())
    );
    let first_container = container_id(&running);

    // Its log, from the virtual node's kubelet API (the admin's certificate, the cluster CA
    // the agent was given from kube-root-ca.crt).
    let path = format!("/containerLogs/{}/ticker/app", apps.name);
    let ip = agent_ip.clone();
    let logged = wait_for(
        "the Wasm pod's log through the kubelet API",
        JOIN_TIMEOUT,
        || {
            let (ip, path) = (ip.clone(), path.clone());
            async move {
                let (code, body) = kubelet_get_at(&ip, &path).await;
                (code == 200 && body.contains("tick 1")).then_some(())
            }
        },
    )
    .await;
    if let Err(e) = logged {
        panic!("{e}: {:?}", kubelet_get_at(&agent_ip, &path).await);
    }

    // The agent pod deleted: the StatefulSet's new pod is the same node.
    drop(relay);
    pods.delete(&vnode, &DeleteParams::default())
        .await
        .expect("delete the agent pod");
    let (_, _relay) =
        agent_pod_with_relay(&pods, &vnode, Some(&first_uid), &host.root(), &ports).await;
    let rerun = wait_for(
        "the Wasm pod run again by the new agent",
        JOIN_TIMEOUT,
        || async {
            let pod = apps.pods().get_opt("ticker").await.ok()??;
            (phase(&pod) == "Running" && container_id(&pod) != first_container).then_some(pod)
        },
    )
    .await;
    let rerun = match rerun {
        Ok(pod) => pod,
        Err(e) => panic!(
            "{e}\nagent pod: {}\nagent pod logs:\n{}",
            pods_status(&pods, &vnode).await,
            agent_pod_logs(&host)
        ),
    };
    let new_agent = pods.get(&vnode).await.unwrap();
    let new_ip = pod_ip(&new_agent).expect("the new agent pod's IP");
    wait_for(
        "the node's InternalIP to follow the new pod",
        JOIN_TIMEOUT,
        || async {
            let node = nodes.get_opt(&vnode).await.ok()??;
            (internal_ip(&node).as_deref() == Some(new_ip.as_str())
                && node_condition(&node, "Ready").as_deref() == Some("True"))
            .then_some(())
        },
    )
    .await
    .unwrap();
    eprintln!(
        "node {vnode}: InternalIP {agent_ip} then {new_ip}; Wasm pod restarts {}",
        rerun
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .map_or(0, |c| c.restart_count)
    );
    assert_eq!(
        bootstrap_csrs(&csrs, &deployment.token_id).await.len(),
        1,
        "the new pod used the certificate on its state volume, no second bootstrap CSR"
    );
    let restarts = rerun
        .status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count);
    assert!(
        restarts >= 1,
        "the Wasm container was run again: {rerun:#?}"
    );
}

fn container_id(pod: &Pod) -> Option<String> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .container_id
        .clone()
}
