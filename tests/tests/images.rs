//! Images end to end: ordinary OCI and Docker v2 images whose layer holds the module their
//! entrypoint names, pushed to the local registry by the test itself (blob uploads and a
//! manifest PUT with curl, the sequence deploy/push-wasm uses: tests/src/registry.rs), and pulls from the local
//! cluster's TLS registry with htpasswd auth through an imagePullSecret. One node and one
//! namespace per test.

use std::process::Command;

use integration_tests::registry::{
    tar_layer, Registry, DOCKER_CONFIG, DOCKER_MANIFEST, DOCKER_TAR_GZIP, OCI_CONFIG, OCI_MANIFEST,
    OCI_TAR, OCI_TAR_GZIP,
};
use integration_tests::{
    example_wasm, phase, test_node, workspace_root, Agent, Cluster, TestNamespace,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::Api;

async fn node() -> Agent {
    test_node("images", &[]).await
}

// ------------------------------------------------------------------ images

/// An image config with these container defaults.
fn image_config(entrypoint: &[&str], cmd: &[&str], diff_ids: &[&str]) -> serde_json::Value {
    serde_json::json!({
        "architecture": "wasm",
        "os": "wasip1",
        "config": {"Entrypoint": entrypoint, "Cmd": if cmd.is_empty() { serde_json::Value::Null } else { serde_json::json!(cmd) }},
        "rootfs": {"type": "layers", "diff_ids": diff_ids},
    })
}

// ------------------------------------------------------------------ namespaces and pods

type Ns = TestNamespace;

/// Single-container pods with restartPolicy Never, in the test's namespace.
trait CreatePods {
    async fn create_pod(
        &self,
        agent: &Agent,
        name: &str,
        container: serde_json::Value,
        extra: serde_json::Value,
    );
}

impl CreatePods for Ns {
    async fn create_pod(
        &self,
        agent: &Agent,
        name: &str,
        container: serde_json::Value,
        extra: serde_json::Value,
    ) {
        let mut spec =
            serde_json::json!({"terminationGracePeriodSeconds": 2, "containers": [container]});
        if let (Some(spec), serde_json::Value::Object(extra)) = (spec.as_object_mut(), extra) {
            spec.extend(extra);
        }
        self.create_bound_pod(agent, name, serde_json::json!({}), spec)
            .await;
    }
}

/// The first container's waiting message, empty when it does not wait.
fn waiting_message(pod: &Pod) -> String {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref()?.first()?.state.as_ref())
        .and_then(|s| s.waiting.as_ref()?.message.clone())
        .unwrap_or_default()
}

fn waiting_reason(pod: &Pod) -> Option<&str> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?
        .reason
        .as_deref()
}

/// The CRI log of a container's first run.
fn log_of(agent: &Agent, ns: &str, pod: &Pod, container: &str) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap();
    let name = pod.metadata.name.as_deref().unwrap();
    let path = agent
        .dir
        .join("logs")
        .join(format!("{ns}_{name}_{uid}"))
        .join(container)
        .join("0.log");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ------------------------------------------------------------------ the tests

#[tokio::test]
async fn an_oci_image_runs_the_module_its_entrypoint_names() {
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    let agent = &node().await;
    let ns = Ns::new("ociimage").await;
    // Two layers: a base with an unrelated file and a stale module, and the app layer on top
    // (which wins), as a Dockerfile `FROM base` + `COPY hello.wasm /app/` makes.
    let (base, base_id) = tar_layer(
        &[
            ("/etc/motd", b"base layer\n"),
            ("/app/hello.wasm", b"\0asm stale"),
        ],
        false,
    );
    let (app, app_id) = tar_layer(&[("/app/hello.wasm", &hello)], true);
    let reference = Registry::plain().push_image(
        "wk-images/hello-oci",
        &agent.name,
        OCI_MANIFEST,
        OCI_CONFIG,
        &image_config(&["/app/hello.wasm"], &[], &[&base_id, &app_id]),
        &[(OCI_TAR, base), (OCI_TAR_GZIP, app)],
    );
    ns.create_pod(
        agent,
        "hello",
        serde_json::json!({"name": "hello", "image": reference}),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "hello", "the OCI image's module to succeed", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    assert_eq!(phase(&pod), "Succeeded", "{:#?}", pod.status);
    let log = log_of(agent, &ns.name, &pod, "hello");
    assert!(log.contains("Hello from WebAssembly!"), "log: {log}");
}

#[tokio::test]
async fn a_docker_image_gives_entrypoint_and_cmd_as_argv() {
    let program = std::fs::read(example_wasm("env-and-args")).unwrap();
    let agent = &node().await;
    let ns = Ns::new("dockerimage").await;
    let (layer, diff_id) = tar_layer(&[("/bin/env-and-args.wasm", &program)], true);
    let reference = Registry::plain().push_image(
        "wk-images/args-docker",
        &agent.name,
        DOCKER_MANIFEST,
        DOCKER_CONFIG,
        &image_config(
            &["/bin/env-and-args.wasm", "from-entrypoint"],
            &["from-cmd"],
            &[&diff_id],
        ),
        &[(DOCKER_TAR_GZIP, layer)],
    );
    // No command, no args: Entrypoint + Cmd. Args only: Entrypoint + args.
    ns.create_pod(
        agent,
        "defaults",
        serde_json::json!({"name": "c", "image": reference}),
        serde_json::json!({}),
    )
    .await;
    ns.create_pod(
        agent,
        "args",
        serde_json::json!({"name": "c", "image": reference, "args": ["from-pod"]}),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "defaults", "the defaults pod to succeed", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    let log = log_of(agent, &ns.name, &pod, "c");
    assert_eq!(phase(&pod), "Succeeded", "log:\n{log}");
    for want in [
        "arg[0]=/bin/env-and-args.wasm",
        "arg[1]=from-entrypoint",
        "arg[2]=from-cmd",
    ] {
        assert!(log.contains(want), "{want} in log:\n{log}");
    }
    let pod = ns
        .wait_pod(agent, "args", "the args pod to succeed", |p| {
            matches!(phase(p), "Succeeded" | "Failed")
        })
        .await;
    let log = log_of(agent, &ns.name, &pod, "c");
    assert!(
        log.contains("arg[1]=from-entrypoint")
            && log.contains("arg[2]=from-pod")
            && !log.contains("from-cmd"),
        "log:\n{log}"
    );
}

#[tokio::test]
async fn an_oci_image_whose_entrypoint_is_not_wasm_is_unsupported() {
    let agent = &node().await;
    let ns = Ns::new("notwasm").await;
    let (layer, diff_id) = tar_layer(&[("/app/run.sh", b"#!/bin/sh\necho hi\n")], true);
    let reference = Registry::plain().push_image(
        "wk-images/script",
        &agent.name,
        OCI_MANIFEST,
        OCI_CONFIG,
        &image_config(&["/app/run.sh"], &[], &[&diff_id]),
        &[(OCI_TAR_GZIP, layer)],
    );
    ns.create_pod(
        agent,
        "script",
        serde_json::json!({"name": "c", "image": reference}),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "script", "the pod to fail", |p| phase(p) == "Failed")
        .await;
    let status = pod.status.as_ref().unwrap();
    assert_eq!(status.reason.as_deref(), Some("UnsupportedImage"));
    let message = status.message.clone().unwrap_or_default();
    assert!(
        message.contains("/app/run.sh") && message.contains("not WebAssembly"),
        "{message}"
    );
}

#[tokio::test]
async fn an_image_pull_secret_opens_the_tls_registry() {
    let hello = example_wasm("hello");
    let cluster = Cluster::get();
    let secure = Registry::secure();
    let agent = &node().await;
    let reference = format!("{}/wasm-examples/hello:{}", secure.host, agent.name);
    let out = Command::new(workspace_root().join("deploy/push-wasm"))
        .arg(&hello)
        .arg(&reference)
        .args([
            "--user",
            secure.user.as_deref().unwrap(),
            "--cacert",
            secure.cacert.as_deref().unwrap(),
        ])
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "push-wasm to the TLS registry: {}",
        String::from_utf8_lossy(&out.stderr)
    );

    let ns = Ns::new("pullsecret").await;
    let dockerconfig = serde_json::json!({"auths": {secure.host.clone(): {"username": cluster.var("SECURE_REGISTRY_USER"), "password": cluster.var("SECURE_REGISTRY_PASSWORD")}}});
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "registry"},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": dockerconfig.to_string()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();

    ns.create_pod(
        agent,
        "with-secret",
        serde_json::json!({"name": "hello", "image": reference}),
        serde_json::json!({"imagePullSecrets": [{"name": "registry"}]}),
    )
    .await;
    ns.create_pod(
        agent,
        "without-secret",
        serde_json::json!({"name": "hello", "image": reference}),
        serde_json::json!({}),
    )
    .await;

    let pod = ns
        .wait_pod(
            agent,
            "with-secret",
            "the pod with the pull secret to succeed",
            |p| matches!(phase(p), "Succeeded" | "Failed"),
        )
        .await;
    assert_eq!(phase(&pod), "Succeeded", "{:#?}", pod.status);
    assert!(log_of(agent, &ns.name, &pod, "hello").contains("Hello from WebAssembly!"));

    let pod = ns
        .wait_pod(
            agent,
            "without-secret",
            "ErrImagePull or ImagePullBackOff",
            |p| matches!(waiting_reason(p), Some("ErrImagePull" | "ImagePullBackOff")),
        )
        .await;
    assert_eq!(phase(&pod), "Pending");
    // The waiting message says which failure it was (the typed Unauthorized pull error).
    let message = waiting_message(&pod);
    assert!(message.contains("unauthorized"), "{message}");
    // The event is published asynchronously, possibly after the waiting reason is visible.
    ns.wait_events(
        agent,
        "without-secret",
        "a Failed event about authentication",
        |events| {
            events
                .iter()
                .filter(|(reason, _)| reason == "Failed")
                .any(|(_, m)| {
                    let m = m.to_ascii_lowercase();
                    m.contains(&reference.to_ascii_lowercase())
                        && (m.contains("unauthorized")
                            || m.contains("not authorized")
                            || m.contains("authentication"))
                })
        },
    )
    .await;
}

#[tokio::test]
async fn an_image_name_that_does_not_parse_is_invalid_image_name() {
    let agent = &node().await;
    let ns = Ns::new("badname").await;
    // The API server accepts any non-blank image; a repository in capitals is no OCI reference.
    let reference = format!(
        "{}/wk-images/NotLowerCase:v1",
        Cluster::get().var("REGISTRY")
    );
    ns.create_pod(
        agent,
        "bad",
        serde_json::json!({"name": "c", "image": reference}),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "bad", "InvalidImageName", |p| {
            p.status
                .as_ref()
                .and_then(|s| s.container_statuses.as_ref())
                .and_then(|c| c.first())
                .and_then(|c| c.state.as_ref()?.waiting.as_ref()?.reason.clone())
                .as_deref()
                == Some("InvalidImageName")
        })
        .await;
    let waiting = pod.status.unwrap().container_statuses.unwrap()[0]
        .state
        .clone()
        .unwrap()
        .waiting
        .unwrap();
    assert!(waiting.message.unwrap_or_default().contains(&reference));
    ns.wait_events(agent, "bad", "an InspectFailed event", |events| {
        events
            .iter()
            .any(|(r, m)| r == "InspectFailed" && m.contains(&reference))
    })
    .await;
    // That it is never pulled again is the fast tier's (pods/worker_tests.rs, on paused time).
}

#[tokio::test]
async fn a_missing_tag_waits_as_err_image_pull_saying_not_found() {
    let agent = &node().await;
    let ns = Ns::new("missingtag").await;
    let reference = format!(
        "{}/wasm-examples/hello:no-such-tag-{}",
        Cluster::get().var("REGISTRY"),
        agent.name
    );
    ns.create_pod(
        agent,
        "missing",
        serde_json::json!({"name": "c", "image": reference}),
        serde_json::json!({}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "missing", "ErrImagePull or ImagePullBackOff", |p| {
            matches!(waiting_reason(p), Some("ErrImagePull" | "ImagePullBackOff"))
        })
        .await;
    assert_eq!(phase(&pod), "Pending");
    let message = waiting_message(&pod);
    assert!(
        message.contains("not found") && message.contains(&reference),
        "{message}"
    );
    ns.wait_events(
        agent,
        "missing",
        "a Failed event saying not found",
        |events| {
            events
                .iter()
                .any(|(r, m)| r == "Failed" && m.contains("not found") && m.contains(&reference))
        },
    )
    .await;
}
