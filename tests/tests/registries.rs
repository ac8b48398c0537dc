//! Registries as users configure them: `--registry-config-dir` in containerd's hosts.toml
//! layout, shared by Wasm and container pods. A short name (`name:v1`, docker.io's) follows
//! docker.io's mirrors and never reaches the internet (its server is a closed loopback port); a
//! mirror that fails gives way to the next host and, last, the registry's own server; a pod's
//! pull secret for docker.io is never sent to a mirror (only a secret naming the mirror's own
//! host is); a broken hosts.toml stops the agent with one line naming the file.

use std::path::PathBuf;
use std::process::Command;

use integration_tests::mixed_node::MixedNode;
use integration_tests::{
    agent_binary, example_wasm, phase, test_node, unique_name, workspace_root, Agent, Cluster,
    TestNamespace,
};
use k8s_openapi::api::core::v1::{Pod, Secret};
use kube::api::PostParams;
use kube::Api;

/// A closed port on loopback: a server no pull may reach (the real docker.io is outside the
/// addresses tests may talk to).
const NOWHERE: &str = "127.0.0.1:1";

/// A registry config dir with `files` (`(namespace, hosts.toml text)`).
fn hosts_dir(what: &str, files: &[(&str, String)]) -> PathBuf {
    let dir = workspace_root()
        .join("target/it")
        .join(unique_name(what))
        .join("certs.d");
    for (namespace, text) in files {
        std::fs::create_dir_all(dir.join(namespace)).unwrap();
        std::fs::write(dir.join(namespace).join("hosts.toml"), text).unwrap();
    }
    dir
}

/// Pushes the hello example as `reference` (with `--user`/`--cacert` for the TLS registry).
fn push_hello(reference: &str, tls: bool) {
    let c = Cluster::get();
    let mut cmd = Command::new(workspace_root().join("deploy/push-wasm"));
    cmd.arg(example_wasm("hello")).arg(reference);
    if tls {
        let user = format!(
            "{}:{}",
            c.var("SECURE_REGISTRY_USER"),
            c.var("SECURE_REGISTRY_PASSWORD")
        );
        cmd.args(["--user", &user, "--cacert", c.var("SECURE_REGISTRY_CA")]);
    }
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "push-wasm {reference}: {}",
        String::from_utf8_lossy(&out.stderr)
    );
}

fn waiting(pod: &Pod) -> (String, String) {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref()?.first()?.state.as_ref())
        .and_then(|s| s.waiting.as_ref())
        .map(|w| {
            (
                w.reason.clone().unwrap_or_default(),
                w.message.clone().unwrap_or_default(),
            )
        })
        .unwrap_or_default()
}

async fn run_pod(ns: &TestNamespace, agent: &Agent, name: &str, image: &str, secret: Option<&str>) {
    let mut spec = serde_json::json!({"containers": [{"name": "c", "image": image}]});
    if let Some(secret) = secret {
        spec["imagePullSecrets"] = serde_json::json!([{"name": secret}]);
    }
    ns.create_bound_pod(agent, name, serde_json::json!({}), spec)
        .await;
}

async fn pull_secret(ns: &TestNamespace, name: &str, registry: &str) {
    let c = Cluster::get();
    let config = serde_json::json!({"auths": {registry: {
        "username": c.var("SECURE_REGISTRY_USER"),
        "password": c.var("SECURE_REGISTRY_PASSWORD"),
    }}});
    let secret: Secret = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "type": "kubernetes.io/dockerconfigjson",
        "stringData": {".dockerconfigjson": config.to_string()},
    }))
    .unwrap();
    Api::<Secret>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &secret)
        .await
        .unwrap();
}

/// docker.io's hosts: the plain local registry, then the TLS one, then a server nobody serves.
/// The local registry's own namespace: a mirror that refuses connections, then its server.
fn docker_io_and_local(what: &str) -> PathBuf {
    let c = Cluster::get();
    hosts_dir(
        what,
        &[
            (
                "docker.io",
                format!(
                    "server = \"https://{NOWHERE}\"\n\
                     [host.\"http://{}\"]\n  capabilities = [\"pull\", \"resolve\"]\n\
                     [host.\"https://{}\"]\n  ca = \"{}\"\n",
                    c.var("REGISTRY"),
                    c.var("SECURE_REGISTRY"),
                    c.var("SECURE_REGISTRY_CA")
                ),
            ),
            (c.var("REGISTRY"), format!("[host.\"http://{NOWHERE}\"]\n")),
        ],
    )
}

#[tokio::test]
async fn short_names_follow_docker_io_mirrors_and_secrets_stay_with_their_registry() {
    let c = Cluster::get();
    let tag = unique_name("mirror");
    // On the plain mirror: docker.io/library/<name>, as a short name means.
    let public = format!("mirrored-{tag}");
    push_hello(&format!("{}/library/{public}:v1", c.var("REGISTRY")), false);
    // Only on the TLS mirror, which wants credentials.
    let private = format!("private-{tag}");
    push_hello(
        &format!("{}/library/{private}:v1", c.var("SECURE_REGISTRY")),
        true,
    );
    let dir = docker_io_and_local("mirrors");
    let flag = format!("--registry-config-dir={}", dir.display());
    let agent = &test_node("mirrors", &[&flag]).await;
    let ns = TestNamespace::new("mirrors").await;
    pull_secret(&ns, "for-docker-io", "docker.io").await;
    pull_secret(&ns, "for-the-mirror", c.var("SECURE_REGISTRY")).await;

    run_pod(&ns, agent, "short-name", &format!("{public}:v1"), None).await;
    run_pod(
        &ns,
        agent,
        "secret-for-docker-io",
        &format!("{private}:v1"),
        Some("for-docker-io"),
    )
    .await;
    run_pod(
        &ns,
        agent,
        "secret-for-the-mirror",
        &format!("docker.io/library/{private}:v1"),
        Some("for-the-mirror"),
    )
    .await;
    // The local registry's namespace: its mirror refuses, its server (plain http, as it is
    // named insecure) serves.
    let direct = format!("{}/library/{public}:v1", c.var("REGISTRY"));
    run_pod(&ns, agent, "past-a-dead-mirror", &direct, None).await;
    let missing = format!("{}/library/{public}-missing:v1", c.var("REGISTRY"));
    run_pod(&ns, agent, "missing", &missing, None).await;

    for name in ["short-name", "secret-for-the-mirror", "past-a-dead-mirror"] {
        let pod = ns
            .wait_pod(agent, name, "the pod to succeed", |p| {
                matches!(phase(p), "Succeeded" | "Failed")
            })
            .await;
        assert_eq!(phase(&pod), "Succeeded", "{name}: {:#?}", pod.status);
    }
    // The kubelet's events for the pull, with its duration and the image's size.
    let events = ns.events("short-name").await;
    let image = format!("{public}:v1");
    assert!(
        events.contains(&("Pulling".into(), format!("Pulling image \"{image}\""))),
        "{events:?}"
    );
    let size = std::fs::metadata(example_wasm("hello")).unwrap().len();
    let pulled = events
        .iter()
        .find(|(reason, _)| reason == "Pulled")
        .map(|(_, message)| message.clone())
        .unwrap_or_default();
    let prefix = format!("Successfully pulled image \"{image}\" in ");
    let suffix = format!(" including waiting). Image size: {size} bytes.");
    assert!(
        pulled.starts_with(&prefix) && pulled.ends_with(&suffix),
        "{pulled:?} is the kubelet's form with the module's {size} bytes"
    );
    // The secret names docker.io: the mirror is not sent it and refuses the pull; the server
    // is unreachable. The pod waits, saying so.
    let pod = ns
        .wait_pod(agent, "secret-for-docker-io", "a pull error", |p| {
            matches!(waiting(p).0.as_str(), "ErrImagePull" | "ImagePullBackOff")
        })
        .await;
    let (_, message) = waiting(&pod);
    let from_the_mirror = message
        .split_once(c.var("SECURE_REGISTRY"))
        .map(|(_, rest)| rest.to_ascii_lowercase())
        .unwrap_or_default();
    assert!(
        from_the_mirror.contains("unauthorized"),
        "the mirror refused (no credentials sent to it): {message}"
    );
    assert!(message.contains("mirrors tried first"), "{message}");
    let pod = ns
        .wait_pod(agent, "missing", "a pull error", |p| {
            matches!(waiting(p).0.as_str(), "ErrImagePull" | "ImagePullBackOff")
        })
        .await;
    let (_, message) = waiting(&pod);
    assert!(
        message.contains("not found")
            && message.contains(&format!("mirrors tried first: {NOWHERE}")),
        "{message}"
    );
}

#[tokio::test]
async fn container_pods_pull_through_the_same_hosts() {
    let c = Cluster::get();
    let dir = docker_io_and_local("mirrors-containers");
    let flag = format!("--registry-config-dir={}", dir.display());
    let node = MixedNode::start("mirrors", &[&flag]).await;
    let ns = TestNamespace::new("mirrors-containers").await;
    // busybox lives on the local registry, whose only mirror refuses connections.
    let spec = |image: String| {
        serde_json::json!({"containers": [{
            "name": "c", "image": image, "command": ["sh", "-c", "echo pulled"],
        }]})
    };
    ns.create_bound_pod(
        &node.agent,
        "busybox",
        serde_json::json!({}),
        spec(MixedNode::busybox()),
    )
    .await;
    let missing = format!("{}/busybox:no-such-tag", c.var("REGISTRY"));
    ns.create_bound_pod(&node.agent, "missing", serde_json::json!({}), spec(missing))
        .await;
    let pod = ns
        .wait_pod(
            &node.agent,
            "busybox",
            "the container pod to succeed",
            |p| matches!(phase(p), "Succeeded" | "Failed"),
        )
        .await;
    assert_eq!(phase(&pod), "Succeeded", "{:#?}", pod.status);
    let pod = ns
        .wait_pod(&node.agent, "missing", "a pull error", |p| {
            matches!(waiting(p).0.as_str(), "ErrImagePull" | "ImagePullBackOff")
        })
        .await;
    let (_, message) = waiting(&pod);
    assert!(
        message.contains(&format!("mirrors tried first: {NOWHERE}")),
        "the containers side tried the mirror first: {message}"
    );
}

#[test]
fn a_broken_hosts_file_stops_the_agent_with_one_line() {
    let dir = hosts_dir(
        "broken-hosts",
        &[(
            "registry.lan",
            "[host.\"https://m.lan\"]\n  client = \"c.pem\"\n".into(),
        )],
    );
    let out = Command::new(agent_binary())
        .args(["--registry-config-dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    let file = dir.join("registry.lan/hosts.toml");
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains(&file.display().to_string()) && stderr.contains("client"),
        "{stderr}"
    );
}
