//! The runtime cache: the PLEG lists the provider, every other reader (workers, eviction, GC,
//! stats, the kubelet API) reads its snapshot. What a reader sees must never be older than
//! what the node has told the API server.

use integration_tests::{
    example_image, kubelet_get, phase, test_node, wait_for, TestNamespace, TEST_TIMEOUT,
};

fn running_uids(body: &str) -> Vec<String> {
    let list: serde_json::Value =
        serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"));
    list["items"]
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|p| p["metadata"]["uid"].as_str().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn a_deleted_pod_is_gone_from_runningpods_before_its_api_object_is() {
    let agent = test_node("cache", &[]).await;
    let ns = TestNamespace::new("cache").await;
    ns.create_bound_pod(
        &agent,
        "tick",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "tick", "image": example_image("ticker")}]}),
    )
    .await;
    let pod = ns
        .wait_pod(&agent, "tick", "the ticker to run", |p| {
            phase(p) == "Running"
        })
        .await;
    let uid = pod.metadata.uid.clone().unwrap();
    wait_for("/runningpods/ to list the ticker", TEST_TIMEOUT, || async {
        let (code, body) = kubelet_get(&agent, "/runningpods/");
        (code == 200 && running_uids(&body).contains(&uid)).then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));

    // Deleted gracefully: the node stops the ticker, then deletes the object. The moment the
    // object is gone, the runtime's view must not list the pod any more.
    ns.pods().delete("tick", &Default::default()).await.unwrap();
    wait_for("the pod object gone", TEST_TIMEOUT, || async {
        ns.pods()
            .get_opt("tick")
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    .unwrap();
    let (code, body) = kubelet_get(&agent, "/runningpods/");
    assert_eq!(code, 200, "{body}");
    assert!(
        !running_uids(&body).contains(&uid),
        "the deleted pod is still listed: {body}\n{}",
        agent.log_tail()
    );
}
