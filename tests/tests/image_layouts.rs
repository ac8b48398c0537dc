//! Images as the common tools lay them out, end to end: each test builds the image the way the
//! tool does (`oras push`, `wkg oci push`, `docker buildx build --platform wasi/wasm`,
//! `spin registry push`) and pushes it to the local plain-http registry itself (blob uploads and
//! a manifest PUT with curl: tests/src/registry.rs), then runs a pod of it through the
//! real API server and checks its output or its HTTP answer. Layouts this node cannot honour
//! fail the pod with reason UnsupportedImage and a message naming what is missing. One node and
//! one namespace per test. See docs/images.md.

use std::path::PathBuf;

use integration_tests::registry::{
    tar_layer, Registry, DOCKER_CONFIG, DOCKER_LIST, DOCKER_MANIFEST, DOCKER_TAR_GZIP, OCI_CONFIG,
    OCI_EMPTY, OCI_INDEX, OCI_MANIFEST, OCI_TAR_GZIP,
};
use integration_tests::{
    example_image, example_wasm, http_get, phase, test_node, wait_for, workspace_root, Agent,
    TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Pod;
use serde_json::{json, Value};

const SPIN_CONFIG: &str = "application/vnd.fermyon.spin.application.v1+config";
const SPIN_WASM: &str = "application/vnd.wasm.content.layer.v1+wasm";
const SPIN_DATA: &str = "application/vnd.wasm.content.layer.v1+data";

// ------------------------------------------------------------------ pushing with curl

fn push_blob(repo: &str, media_type: &str, bytes: &[u8]) -> Value {
    Registry::plain().push_blob(repo, media_type, bytes)
}

fn push_manifest(repo: &str, tag: &str, media_type: &str, manifest: &Value) -> Value {
    Registry::plain().push_manifest(repo, tag, media_type, manifest)
}

fn reference(repo: &str, tag: &str) -> String {
    Registry::plain().reference(repo, tag)
}

/// A wasm-examples component (wasm32-wasip2 build output; built and pushed first).
fn example_component(file: &str) -> Vec<u8> {
    example_image("hello-component");
    let target = std::env::var_os("WASM_EXAMPLES_TARGET_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/wasm-examples"));
    let path = target.join("wasm32-wasip2/release").join(file);
    std::fs::read(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

// ------------------------------------------------------------------ the layouts

/// `oras push $REF hello.wasm:application/wasm [--artifact-type T]`: an OCI manifest whose
/// config is oras 1.x's empty descriptor (or older oras's `unknown` config), the module a layer
/// titled with its file name.
fn push_oras(repo: &str, tag: &str, module: &[u8], older: bool) -> String {
    let layer = push_blob(repo, "application/wasm", module);
    let mut layer = layer.as_object().unwrap().clone();
    layer.insert(
        "annotations".into(),
        json!({"org.opencontainers.image.title": "hello.wasm"}),
    );
    let mut manifest = if older {
        let config = push_blob(repo, "application/vnd.unknown.config.v1+json", b"{}");
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [layer]})
    } else {
        let mut config = push_blob(repo, OCI_EMPTY, b"{}");
        config["data"] = "e30=".into();
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
            "artifactType": "application/vnd.example.wasm.v1", "config": config, "layers": [layer]})
    };
    manifest["annotations"] = json!({"org.opencontainers.image.created": "2026-01-01T00:00:00Z"});
    push_manifest(repo, tag, OCI_MANIFEST, &manifest);
    reference(repo, tag)
}

/// `wkg oci push $REF component.wasm`: config `application/vnd.wasm.config.v0+json` (the
/// CNCF TAG Runtime Wasm OCI artifact layout), one `application/wasm` layer.
fn push_wkg(repo: &str, tag: &str, component: &[u8]) -> String {
    let layer = push_blob(repo, "application/wasm", component);
    let config = json!({
        "created": "2026-01-01T00:00:00Z",
        "architecture": "wasm",
        "os": "wasip2",
        "layerDigests": [layer["digest"]],
        "component": {"exports": ["wasi:cli/run@0.2.0"], "imports": ["wasi:cli/stdout@0.2.0"], "target": null},
    });
    let config = push_blob(
        repo,
        "application/vnd.wasm.config.v0+json",
        config.to_string().as_bytes(),
    );
    let manifest = json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST,
        "artifactType": "application/vnd.wasm.config.v0+json", "config": config, "layers": [layer],
        "annotations": {"org.opencontainers.image.version": "0.1.0"}});
    push_manifest(repo, tag, OCI_MANIFEST, &manifest);
    reference(repo, tag)
}

/// `docker buildx build --platform wasi/wasm --push` of `FROM scratch`, `COPY hello.wasm
/// /app.wasm`, `ENTRYPOINT ["/app.wasm"]`: an index with the wasi/wasm image and (with
/// `docker`, the classic builder's media types and no attestation; else BuildKit's OCI ones)
/// an attestation manifest listed first.
fn push_docker_wasi(repo: &str, tag: &str, module: &[u8], classic: bool) -> String {
    let (manifest_type, config_type, layer_type, index_type) = if classic {
        (DOCKER_MANIFEST, DOCKER_CONFIG, DOCKER_TAR_GZIP, DOCKER_LIST)
    } else {
        (OCI_MANIFEST, OCI_CONFIG, OCI_TAR_GZIP, OCI_INDEX)
    };
    let (layer, diff_id) = tar_layer(&[("/app.wasm", module)], true);
    let layer = push_blob(repo, layer_type, &layer);
    let config = json!({"architecture": "wasm", "os": "wasi",
        "config": {"Entrypoint": ["/app.wasm"], "WorkingDir": "/"},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}});
    let config = push_blob(repo, config_type, config.to_string().as_bytes());
    let image = push_manifest(
        repo,
        &format!("{tag}-image"),
        manifest_type,
        &json!({"schemaVersion": 2, "mediaType": manifest_type, "config": config, "layers": [layer]}),
    );
    let mut entry = image.as_object().unwrap().clone();
    entry.insert(
        "platform".into(),
        json!({"architecture": "wasm", "os": "wasi"}),
    );
    let mut entries = vec![Value::Object(entry)];
    if !classic {
        // BuildKit's provenance attestation: an in-toto layer, platform unknown/unknown.
        let statement = json!({"_type": "https://in-toto.io/Statement/v0.1",
            "predicateType": "https://slsa.dev/provenance/v0.2", "subject": [{"digest": {"sha256": image["digest"].as_str().unwrap().trim_start_matches("sha256:")}}]});
        let att_layer = push_blob(
            repo,
            "application/vnd.in-toto+json",
            statement.to_string().as_bytes(),
        );
        let att_config = push_blob(
            repo,
            OCI_CONFIG,
            json!({"architecture": "unknown", "os": "unknown", "config": {}, "rootfs": {"type": "layers", "diff_ids": [att_layer["digest"]]}}).to_string().as_bytes(),
        );
        let attestation = push_manifest(
            repo,
            &format!("{tag}-attestation"),
            OCI_MANIFEST,
            &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": att_config, "layers": [att_layer]}),
        );
        let mut att = attestation.as_object().unwrap().clone();
        att.insert(
            "platform".into(),
            json!({"architecture": "unknown", "os": "unknown"}),
        );
        att.insert(
            "annotations".into(),
            json!({"vnd.docker.reference.digest": image["digest"], "vnd.docker.reference.type": "attestation-manifest"}),
        );
        entries.insert(0, Value::Object(att));
    }
    push_manifest(
        repo,
        tag,
        index_type,
        &json!({"schemaVersion": 2, "mediaType": index_type, "manifests": entries}),
    );
    reference(repo, tag)
}

/// `spin registry push`: the config is the app's lock file with each component's source
/// replaced by its layer digest (spin.lock flattens the content reference: `source.digest`);
/// one `+wasm` layer per component source, one `+data` layer per file. `components` are
/// (id, source bytes, route or a trigger type, files).
#[allow(clippy::type_complexity)]
fn push_spin(
    repo: &str,
    tag: &str,
    components: &[(&str, &[u8], &str, &[(&str, &[u8])])],
    variables: Value,
) -> String {
    let mut layers = Vec::new();
    let mut locked = Vec::new();
    let mut triggers = Vec::new();
    for (id, source, route, files) in components {
        let layer = push_blob(repo, SPIN_WASM, source);
        let mut component = json!({"id": id,
            "metadata": {"allowed_outbound_hosts": []},
            "source": {"content_type": "application/wasm", "digest": layer["digest"]}});
        layers.push(layer);
        let files: Vec<Value> = files
            .iter()
            .map(|(path, bytes)| {
                let data = push_blob(repo, SPIN_DATA, bytes);
                let file = json!({"digest": data["digest"], "path": path});
                layers.push(data);
                file
            })
            .collect();
        if !files.is_empty() {
            component["files"] = Value::Array(files);
        }
        locked.push(component);
        triggers.push(if route.starts_with('/') {
            json!({"id": format!("trigger--{id}"), "trigger_type": "http",
                "trigger_config": {"component": id, "route": route}})
        } else {
            json!({"id": format!("trigger--{id}"), "trigger_type": route,
                "trigger_config": {"component": id, "channel": "messages"}})
        });
    }
    let mut lock = json!({"spin_lock_version": 1,
        "metadata": {"name": repo.rsplit('/').next().unwrap(), "version": "0.1.0",
            "trigger": {"type": "http"}},
        "triggers": triggers, "components": locked});
    if variables.is_object() {
        lock["variables"] = variables;
    }
    let config = push_blob(repo, SPIN_CONFIG, lock.to_string().as_bytes());
    let manifest =
        json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": layers});
    push_manifest(repo, tag, OCI_MANIFEST, &manifest);
    reference(repo, tag)
}

// ------------------------------------------------------------------ pods

/// A pod of one container `c` of `image`, restartPolicy Never; `container` merged in.
async fn run_pod(ns: &TestNamespace, agent: &Agent, name: &str, image: &str, container: Value) {
    let mut c = json!({"name": "c", "image": image});
    c.as_object_mut()
        .unwrap()
        .extend(container.as_object().cloned().unwrap_or_default());
    ns.create_bound_pod(
        agent,
        name,
        json!({}),
        json!({"terminationGracePeriodSeconds": 2, "containers": [c]}),
    )
    .await;
}

/// The pod once it ended (Succeeded or Failed).
async fn ended(ns: &TestNamespace, agent: &Agent, name: &str) -> Pod {
    ns.wait_pod(agent, name, "the pod to end", |p| {
        matches!(phase(p), "Succeeded" | "Failed")
    })
    .await
}

fn log_of(agent: &Agent, ns: &str, pod: &Pod) -> String {
    let uid = pod.metadata.uid.as_deref().unwrap();
    let name = pod.metadata.name.as_deref().unwrap();
    let path = agent
        .dir
        .join("logs")
        .join(format!("{ns}_{name}_{uid}"))
        .join("c/0.log");
    std::fs::read_to_string(&path).unwrap_or_else(|e| panic!("{}: {e}", path.display()))
}

/// The pod's (reason, message) once it failed or its container runs: an image this node
/// refuses fails the pod; one it (wrongly) accepts runs.
async fn refused(ns: &TestNamespace, agent: &Agent, name: &str) -> (String, String) {
    let pod = ns
        .wait_pod(agent, name, "the pod to fail or run", |p| {
            phase(p) == "Failed" || phase(p) == "Running" || phase(p) == "Succeeded"
        })
        .await;
    let status = pod.status.clone().unwrap_or_default();
    assert_eq!(
        phase(&pod),
        "Failed",
        "{name}: the image must be refused, not run: {status:?}"
    );
    (
        status.reason.unwrap_or_default(),
        status.message.unwrap_or_default(),
    )
}

/// `n` distinct ports free on the node's address, for pods to declare (chosen by the kernel;
/// the listeners are held until all are chosen).
fn free_ports(ip: &str, n: usize) -> Vec<u16> {
    let listeners: Vec<std::net::TcpListener> = (0..n)
        .map(|_| std::net::TcpListener::bind((ip, 0)).expect("a free port on the node IP"))
        .collect();
    listeners
        .iter()
        .map(|l| l.local_addr().expect("a bound address").port())
        .collect()
}

// ------------------------------------------------------------------ the tests

#[tokio::test]
async fn an_oras_pushed_module_runs() {
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    let agent = &test_node("layouts-oras", &[]).await;
    let ns = TestNamespace::new("oras").await;
    let current = push_oras("wk-layouts/oras", &agent.name, &hello, false);
    let older = push_oras("wk-layouts/oras-old", &agent.name, &hello, true);
    run_pod(&ns, agent, "oras", &current, json!({})).await;
    run_pod(&ns, agent, "oras-old", &older, json!({})).await;
    for name in ["oras", "oras-old"] {
        let pod = ended(&ns, agent, name).await;
        assert_eq!(phase(&pod), "Succeeded", "{name}: {:?}", pod.status);
        let log = log_of(agent, &ns.name, &pod);
        assert!(log.contains("Hello from WebAssembly!"), "{name}: {log}");
    }
}

#[tokio::test]
async fn a_wkg_pushed_component_runs() {
    let component = example_component("hello-component.wasm");
    let agent = &test_node("layouts-wkg", &[]).await;
    let ns = TestNamespace::new("wkg").await;
    let image = push_wkg("wk-layouts/wkg", &agent.name, &component);
    run_pod(&ns, agent, "wkg", &image, json!({})).await;
    let pod = ended(&ns, agent, "wkg").await;
    assert_eq!(phase(&pod), "Succeeded", "{:?}", pod.status);
    let log = log_of(agent, &ns.name, &pod);
    assert!(log.contains("Hello from a WebAssembly component!"), "{log}");
}

#[tokio::test]
async fn a_docker_wasi_wasm_image_runs_and_its_attestation_is_skipped() {
    let hello = std::fs::read(example_wasm("hello")).unwrap();
    let agent = &test_node("layouts-docker", &[]).await;
    let ns = TestNamespace::new("dockerwasi").await;
    let buildx = push_docker_wasi("wk-layouts/buildx", &agent.name, &hello, false);
    let classic = push_docker_wasi("wk-layouts/docker", &agent.name, &hello, true);
    run_pod(&ns, agent, "buildx", &buildx, json!({})).await;
    run_pod(&ns, agent, "classic", &classic, json!({})).await;
    for name in ["buildx", "classic"] {
        let pod = ended(&ns, agent, name).await;
        assert_eq!(phase(&pod), "Succeeded", "{name}: {:?}", pod.status);
        let log = log_of(agent, &ns.name, &pod);
        assert!(log.contains("Hello from WebAssembly!"), "{name}: {log}");
    }
}

#[tokio::test]
async fn a_spin_app_of_one_http_component_is_served() {
    let http = example_component("http_health.wasm");
    let hello = example_component("hello-component.wasm");
    let agent = &test_node("layouts-spin", &[]).await;
    let ns = TestNamespace::new("spin").await;
    // The component's source is its own layer, not the first one: a second, unused Wasm
    // layer comes first (spin pushes one layer per distinct source; a lock names which).
    let repo = "wk-layouts/spin";
    let decoy = push_blob(repo, SPIN_WASM, &hello);
    let image = {
        let layer = push_blob(repo, SPIN_WASM, &http);
        let lock = json!({"spin_lock_version": 1,
            "metadata": {"name": "spin", "version": "0.1.0", "trigger": {"type": "http"}},
            "triggers": [{"id": "trigger--web", "trigger_type": "http",
                "trigger_config": {"component": "web", "route": "/..."}}],
            "components": [{"id": "web", "metadata": {"allowed_outbound_hosts": []},
                "source": {"content_type": "application/wasm", "digest": layer["digest"]}}]});
        let config = push_blob(repo, SPIN_CONFIG, lock.to_string().as_bytes());
        push_manifest(
            repo,
            &agent.name,
            OCI_MANIFEST,
            &json!({"schemaVersion": 2, "mediaType": OCI_MANIFEST, "config": config, "layers": [decoy, layer]}),
        );
        reference(repo, &agent.name)
    };
    let port = free_ports(&agent.node_ip, 1)[0];
    run_pod(
        &ns,
        agent,
        "web",
        &image,
        json!({"ports": [{"name": "http", "containerPort": port}]}),
    )
    .await;
    let ip = agent.node_ip.clone();
    let answer = wait_for("the Spin component to answer", TEST_TIMEOUT, || {
        let ip = ip.clone();
        async move { http_get(&ip, port, "/").await.ok() }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert_eq!(answer, (200, "hello from http-health\n".to_string()));
}

#[tokio::test]
async fn a_spin_app_this_node_cannot_honour_is_an_unsupported_image() {
    let http = example_component("http_health.wasm");
    let agent = &test_node("layouts-spin-no", &[]).await;
    let ns = TestNamespace::new("spinno").await;
    let none: &[(&str, &[u8])] = &[];
    let cases: Vec<(&str, String, &str)> = vec![
        (
            "two",
            push_spin(
                "wk-layouts/spin-two",
                &agent.name,
                &[
                    ("web", &http, "/...", none),
                    ("api", &http, "/api/...", none),
                ],
                Value::Null,
            ),
            "it has 2 components (web, api)",
        ),
        (
            "redis",
            push_spin(
                "wk-layouts/spin-redis",
                &agent.name,
                &[("worker", &http, "redis", none)],
                Value::Null,
            ),
            "it has a \"redis\" trigger",
        ),
        (
            "files",
            push_spin(
                "wk-layouts/spin-files",
                &agent.name,
                &[(
                    "web",
                    &http,
                    "/...",
                    &[("/static/index.html", b"<h1>hi</h1>")],
                )],
                Value::Null,
            ),
            "component \"web\" has files",
        ),
        (
            "variables",
            push_spin(
                "wk-layouts/spin-vars",
                &agent.name,
                &[("web", &http, "/...", none)],
                json!({"api_token": {"required": true, "secret": true}}),
            ),
            "it declares application variables (api_token)",
        ),
    ];
    // Each declares a port of its own, as a Spin app's pod would: were the image accepted, its
    // http component would run (and the test say so), not wait for a port.
    let ports = free_ports(&agent.node_ip, cases.len());
    for ((name, image, _), port) in cases.iter().zip(ports) {
        let ports = json!({"ports": [{"name": "http", "containerPort": port}]});
        run_pod(&ns, agent, name, image, ports).await;
    }
    for (name, _, want) in &cases {
        let (reason, message) = refused(&ns, agent, name).await;
        assert_eq!(reason, "UnsupportedImage", "{name}: {message}");
        assert!(
            message.contains("is a Spin application") && message.contains(want),
            "{name}: {want:?} in {message}"
        );
        assert!(
            message.contains("exactly one component"),
            "{name}: the message says what is supported: {message}"
        );
    }
}
