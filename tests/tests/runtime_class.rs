//! RuntimeClass: the node looks up a pod's `runtimeClassName` and routes its sandbox by the
//! handler. On a Wasm-only node (no --container-runtime-endpoint) `wasm`/`wasmtime` run the
//! pod; any other handler is refused with a Warning event naming it, and the pod never runs.
//! Each test makes its own cluster-scoped RuntimeClass (a unique name) and deletes it.

use integration_tests::{example_image, phase, test_node, unique_name, Cluster, TestNamespace};
use k8s_openapi::api::node::v1::RuntimeClass;
use kube::api::PostParams;
use kube::Api;

/// A RuntimeClass with `handler`, deleted when dropped.
struct Class {
    name: String,
}

impl Class {
    async fn new(handler: &str) -> Class {
        let api: Api<RuntimeClass> = Api::all(Cluster::get().admin().await);
        let name = unique_name("rc");
        let class: RuntimeClass = serde_json::from_value(serde_json::json!({
            "apiVersion": "node.k8s.io/v1",
            "kind": "RuntimeClass",
            "metadata": {"name": name},
            "handler": handler,
        }))
        .expect("a RuntimeClass");
        api.create(&PostParams::default(), &class)
            .await
            .expect("the RuntimeClass is created");
        Class { name }
    }
}

impl Drop for Class {
    fn drop(&mut self) {
        // kubectl, not the test's client: drop may run where the test's runtime cannot.
        let _ = Cluster::get()
            .kubectl()
            .args(["delete", "runtimeclass", &self.name, "--wait=false"])
            .output();
    }
}

fn pod_spec(class: &str) -> serde_json::Value {
    serde_json::json!({
        "runtimeClassName": class,
        "restartPolicy": "Never",
        "containers": [{"name": "app", "image": example_image("ticker")}],
    })
}

#[tokio::test]
async fn a_wasm_runtime_class_runs_the_pod() {
    let agent = &test_node("rc-wasm", &[]).await;
    let ns = TestNamespace::new("rc-wasm").await;
    let class = Class::new("wasm").await;
    ns.create_bound_pod(agent, "p", serde_json::json!({}), pod_spec(&class.name))
        .await;
    ns.wait_pod(agent, "p", "Running", |p| phase(p) == "Running")
        .await;
}

#[tokio::test]
async fn another_handler_is_refused_on_a_wasm_only_node_with_an_event_naming_it() {
    let agent = &test_node("rc-runc", &[]).await;
    let ns = TestNamespace::new("rc-runc").await;
    let class = Class::new("runc").await;
    ns.create_bound_pod(agent, "p", serde_json::json!({}), pod_spec(&class.name))
        .await;
    let events = ns
        .wait_events(
            agent,
            "p",
            "FailedCreatePodSandBox naming the handler",
            |events| {
                events.iter().any(|(reason, message)| {
                    reason == "FailedCreatePodSandBox"
                        && message.contains("RuntimeHandler \"runc\" is not supported")
                })
            },
        )
        .await;
    eprintln!("{events:?}");
    let pods: Api<k8s_openapi::api::core::v1::Pod> =
        Api::namespaced(Cluster::get().admin().await, &ns.name);
    let pod = pods.get("p").await.expect("the pod");
    assert_eq!(
        phase(&pod),
        "Pending",
        "the pod never runs: {:?}",
        pod.status
    );
}
