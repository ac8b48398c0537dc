//! Cancellation: what a worker has under way for a pod (an image pull, a container start) is
//! interrupted when the pod is deleted, not waited out. The registry here is a listener on
//! 127.0.0.1 that accepts connections and never answers, so a pull from it makes no progress
//! until the pull progress deadline (set far beyond the test's wait).

use std::io::Read;
use std::net::TcpListener;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::{
    unique_name, wait_for, workspace_root, Agent, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Node;
use kube::api::DeleteParams;

/// A "registry" that accepts every connection and never says a word; counts connections.
struct SilentRegistry {
    address: String,
    connections: Arc<AtomicUsize>,
}

impl SilentRegistry {
    fn start() -> SilentRegistry {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let address = listener.local_addr().expect("its address").to_string();
        let connections = Arc::new(AtomicUsize::new(0));
        let counter = connections.clone();
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                counter.fetch_add(1, Ordering::SeqCst);
                // Read (and drop) whatever the agent sends until it hangs up; answer nothing.
                std::thread::spawn(move || {
                    let mut buf = [0u8; 4096];
                    while matches!(stream.read(&mut buf), Ok(n) if n > 0) {}
                });
            }
        });
        SilentRegistry {
            address,
            connections,
        }
    }
}

/// A node of its own that may speak plain http to `registry`, with a pull progress deadline
/// far longer than any wait below (so only cancellation can end the pull in time).
async fn node(registry: &str) -> Agent {
    let name = unique_name("cancel");
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let insecure = format!("--insecure-registries={registry}");
    let args = [
        "--pod-logs-dir",
        logs.to_str().expect("utf-8 path"),
        &insecure,
        "--image-pull-progress-deadline=30m",
    ];
    let agent = Agent::start(&name, &args).expect("the agent starts");
    let nodes: kube::Api<Node> = kube::Api::all(Cluster::get().admin().await);
    wait_for("the test node to register", TEST_TIMEOUT, || async {
        nodes.get_opt(&agent.name).await.ok()?
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    agent
}

#[tokio::test]
async fn a_pod_deleted_during_a_hanging_pull_is_gone_without_waiting_for_the_pull() {
    let registry = SilentRegistry::start();
    let agent = &node(&registry.address).await;
    let ns = TestNamespace::new("cancel").await;
    let image = format!("{}/wk-cancel/hang:v1", registry.address);
    ns.create_bound_pod(
        agent,
        "hang",
        serde_json::json!({}),
        serde_json::json!({
            "terminationGracePeriodSeconds": 30,
            "containers": [{"name": "c", "image": image}],
        }),
    )
    .await;
    // The pull is under way: the registry has been connected to.
    wait_for("the pull to reach the registry", TEST_TIMEOUT, || async {
        (registry.connections.load(Ordering::SeqCst) > 0).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));

    // A graceful delete (the pod's own 30 s grace period).
    ns.pods()
        .delete("hang", &DeleteParams::default())
        .await
        .expect("the delete is accepted");
    // Nothing runs, so the node removes the object as soon as it sees the delete; a worker
    // stuck in the pull would hold it for the 30-minute progress deadline. The bound is
    // generous for a loaded machine, and far below that.
    wait_for(
        "the pod object to be gone",
        Duration::from_secs(60),
        || async {
            match ns.pods().get_opt("hang").await {
                Ok(None) => Some(()),
                _ => None,
            }
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
}
