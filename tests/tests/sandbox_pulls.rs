//! The sandbox holds, for image pulls and compilation: an image reference is not a way to make
//! the agent speak plain http to a port of the pod's choosing, and an image cannot make the
//! agent allocate, inflate or compile without bound. Each test runs its own node against the
//! real control plane and the local cluster's registry; images are pushed by the test itself.

use std::io::{Read, Write};
use std::net::TcpListener;
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;

use integration_tests::registry::{tar_layer, Registry, OCI_CONFIG, OCI_MANIFEST, OCI_TAR_GZIP};
use integration_tests::{
    push_wasm, push_wat, unique_name, wait_for, workspace_root, Agent, Cluster, TestNamespace,
    TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Event, Node, Pod};

/// A node of its own (no wasm-examples needed: every guest here is written in the test).
async fn node(extra: &[&str]) -> Agent {
    let name = unique_name("pulls");
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let mut args = vec!["--pod-logs-dir", logs.to_str().expect("utf-8 path")];
    args.extend_from_slice(extra);
    let agent = Agent::start(&name, &args).expect("the agent starts");
    let nodes: kube::Api<Node> = kube::Api::all(Cluster::get().admin().await);
    wait_for("the test node to register", TEST_TIMEOUT, || async {
        nodes.get_opt(&agent.name).await.ok()?
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    agent
}

fn waiting(pod: &Pod) -> Option<(String, String)> {
    let w = pod
        .status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .first()?
        .state
        .as_ref()?
        .waiting
        .as_ref()?;
    Some((
        w.reason.clone().unwrap_or_default(),
        w.message.clone().unwrap_or_default(),
    ))
}

fn pull_failed(pod: &Pod) -> bool {
    waiting(pod).is_some_and(|(reason, _)| reason == "ErrImagePull" || reason == "ImagePullBackOff")
}

/// (VmRSS, VmHWM) of a process, in KiB.
fn memory_kib(pid: u32) -> (u64, u64) {
    let status =
        std::fs::read_to_string(format!("/proc/{pid}/status")).expect("the agent's /proc status");
    let field = |name: &str| {
        status
            .lines()
            .find_map(|l| l.strip_prefix(name))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .expect("a memory field")
    };
    (field("VmRSS:"), field("VmHWM:"))
}

const HELLO: &str = r#"(module
  (import "wasi_snapshot_preview1" "proc_exit" (func $exit (param i32)))
  (memory (export "memory") 1)
  (func (export "_start") (call $exit (i32.const 0))))"#;

/// Runs a small pod to completion first, so the memory an agent's first pod costs (threads,
/// clients, the engine warming) is in the baseline, not in what is measured.
async fn warm_up(agent: &Agent, ns: &TestNamespace) {
    let hello = push_wat("pulls-hello", HELLO);
    ns.create_bound_pod(
        agent,
        "warm-up",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": hello}]}),
    )
    .await;
    ns.wait_pod(agent, "warm-up", "the warm-up pod to succeed", |p| {
        integration_tests::phase(p) == "Succeeded"
    })
    .await;
}

/// A listener on 127.0.0.1 standing for any plain-http daemon of the node (the kubelet's
/// healthz port, a metadata service): it answers every connection with an HTTP 404 whose body
/// is a secret, and counts the plain-http requests it was sent.
struct SecretServer {
    port: u16,
    secret: String,
    http_requests: Arc<AtomicUsize>,
}

impl SecretServer {
    fn start() -> SecretServer {
        let listener = TcpListener::bind("127.0.0.1:0").expect("a loopback port");
        let port = listener.local_addr().unwrap().port();
        let secret = format!("SECRET-{}-{port}", std::process::id());
        let http_requests = Arc::new(AtomicUsize::new(0));
        let (body, counter) = (secret.clone(), http_requests.clone());
        std::thread::spawn(move || {
            for stream in listener.incoming() {
                let Ok(mut stream) = stream else { return };
                let _ = stream.set_read_timeout(Some(Duration::from_secs(5)));
                let mut buf = [0u8; 4096];
                let n = stream.read(&mut buf).unwrap_or(0);
                let head = &buf[..n];
                if head.starts_with(b"GET ") || head.starts_with(b"HEAD ") {
                    counter.fetch_add(1, Ordering::SeqCst);
                }
                let response = format!("HTTP/1.1 404 Not Found\r\nContent-Type: text/plain\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len());
                let _ = stream.write_all(response.as_bytes());
            }
        });
        SecretServer {
            port,
            secret,
            http_requests,
        }
    }
}

#[tokio::test]
async fn an_image_reference_cannot_make_the_agent_speak_plain_http_to_a_loopback_port() {
    let server = SecretServer::start();
    let agent = &node(&[]).await;
    let ns = TestNamespace::new("pulls-port").await;
    let image = format!("127.0.0.1:{}/x:y", server.port);
    ns.create_bound_pod(
        agent,
        "scan",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": image}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "scan", "the pull to fail", pull_failed)
        .await;

    let events = ns.events("scan").await;
    let (_, message) = waiting(&pod).unwrap();
    for text in events.iter().map(|(_, m)| m).chain([&message]) {
        assert!(
            !text.contains(&server.secret),
            "the body of what answered on 127.0.0.1:{} reached the pod: {text}",
            server.port
        );
    }
    assert_eq!(
        server.http_requests.load(Ordering::SeqCst),
        0,
        "the agent sent plain-http requests to 127.0.0.1:{}; events: {events:#?}",
        server.port
    );
    assert!(
        message.contains("--insecure-registries"),
        "the message says why plain http was not tried: {message}"
    );

    // The cluster's registry, named in --insecure-registries (Agent::start does), still works.
    let hello = push_wat("pulls-hello", HELLO);
    ns.create_bound_pod(
        agent,
        "hello",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": hello}]}),
    )
    .await;
    ns.wait_pod(
        agent,
        "hello",
        "the pod from the insecure registry to succeed",
        |p| integration_tests::phase(p) == "Succeeded",
    )
    .await;
}

/// A valid core module padded with a custom section to `size` bytes at least.
fn padded_module(size: usize) -> Vec<u8> {
    let mut wasm = wat::parse_str(HELLO).unwrap();
    let name = b"padding";
    let payload = size;
    let mut section = vec![name.len() as u8];
    section.extend_from_slice(name);
    section.resize(payload, 0);
    wasm.push(0); // custom section id
    let mut len = section.len() as u64;
    loop {
        let byte = (len & 0x7f) as u8;
        len >>= 7;
        if len == 0 {
            wasm.push(byte);
            break;
        }
        wasm.push(byte | 0x80);
    }
    wasm.extend_from_slice(&section);
    wasm
}

#[tokio::test]
async fn a_module_over_the_max_module_size_is_refused_before_it_is_downloaded() {
    // 48 MiB, against a cap of 1 MiB: a download held in memory would show in the peak RSS.
    let big = push_wasm("pulls-big", &padded_module(48 << 20));
    let agent = &node(&["--max-module-size=1Mi"]).await;
    let ns = TestNamespace::new("pulls-big").await;
    warm_up(agent, &ns).await;
    let pid = agent.pid().expect("the agent runs");
    let (rss_before, hwm_before) = memory_kib(pid);
    ns.create_bound_pod(
        agent,
        "big",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": big}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "big", "the pull to be refused", pull_failed)
        .await;
    let (_, message) = waiting(&pod).unwrap();
    assert!(
        message.contains("--max-module-size") && message.contains("1048576"),
        "a clear reason: {message}"
    );
    let (rss_after, hwm_after) = memory_kib(pid);
    eprintln!("agent VmRSS {rss_before} -> {rss_after} KiB, VmHWM {hwm_before} -> {hwm_after} KiB");
    // Less than half the module: it was never held in memory.
    assert!(
        hwm_after < hwm_before + 24 * 1024,
        "the agent's peak RSS grew by {} KiB for a refused 48 MiB module",
        hwm_after - hwm_before
    );
    let blobs = agent.dir.join("root/images/blobs/sha256");
    let stored: u64 = std::fs::read_dir(&blobs)
        .into_iter()
        .flatten()
        .flatten()
        .filter_map(|e| e.metadata().ok())
        .map(|m| m.len())
        .sum();
    assert!(
        stored < 1 << 20,
        "{stored} bytes were written to {}",
        blobs.display()
    );
}

// ------------------------------------------------------------------ an ordinary OCI image

/// Pushes an OCI image whose single tar.gz layer holds `padding` (each (path, size) of zeros,
/// named to sort before the module) and `/app/x.wasm`, the entrypoint; returns its reference.
fn push_layered_image(repo: &str, padding: &[(&str, usize)], module: &[u8]) -> String {
    let zeros: Vec<(&str, Vec<u8>)> = padding
        .iter()
        .map(|(path, size)| (*path, vec![0u8; *size]))
        .collect();
    let mut files: Vec<(&str, &[u8])> = zeros.iter().map(|(p, z)| (*p, &z[..])).collect();
    files.push(("/app/x.wasm", module));
    let (layer, diff_id) = tar_layer(&files, true);
    let config = serde_json::json!({"architecture": "wasm", "os": "wasip1",
        "config": {"Entrypoint": ["/app/x.wasm"]},
        "rootfs": {"type": "layers", "diff_ids": [diff_id]}});
    Registry::plain().push_image(
        repo,
        &unique_name("t"),
        OCI_MANIFEST,
        OCI_CONFIG,
        &config,
        &[(OCI_TAR_GZIP, layer)],
    )
}

#[tokio::test]
async fn a_layer_that_inflates_past_the_cap_is_refused() {
    // 64 MiB of zeros gzip to ~64 KiB; the module after them in the layer is never reached.
    let module = wat::parse_str(HELLO).unwrap();
    let image = push_layered_image("it-pulls/bomb", &[("aaa-zeros", 64 << 20)], &module);
    let agent = &node(&["--max-layer-uncompressed-size=1Mi"]).await;
    let ns = TestNamespace::new("pulls-bomb").await;
    warm_up(agent, &ns).await;
    let pid = agent.pid().expect("the agent runs");
    let (rss_before, hwm_before) = memory_kib(pid);
    ns.create_bound_pod(
        agent,
        "bomb",
        serde_json::json!({}),
        serde_json::json!({"containers": [{"name": "c", "image": image}]}),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "bomb", "the layer to be refused", pull_failed)
        .await;
    let (_, message) = waiting(&pod).unwrap();
    assert!(
        message.contains("inflates to more than 1048576 bytes")
            && message.contains("--max-layer-uncompressed-size"),
        "a clear reason: {message}"
    );
    let (rss_after, hwm_after) = memory_kib(pid);
    eprintln!("agent VmRSS {rss_before} -> {rss_after} KiB, VmHWM {hwm_before} -> {hwm_after} KiB");
    // Less than half of what the layer inflates to: it was never held in memory.
    assert!(
        hwm_after < hwm_before + 32 * 1024,
        "the agent's peak RSS grew by {} KiB",
        hwm_after - hwm_before
    );
    let scratch = agent.dir.join("root/images/tmp");
    let left = std::fs::read_dir(&scratch).into_iter().flatten().count();
    assert_eq!(
        left,
        0,
        "the downloaded layer is removed from {}",
        scratch.display()
    );
}

#[tokio::test]
async fn a_module_that_fails_to_compile_is_compiled_once_however_often_it_restarts() {
    // A function section naming type 5 of a module with no types: well-formed, invalid.
    let broken: &[u8] = b"\0asm\x01\0\0\0\x03\x02\x01\x05";
    let image = push_wasm("pulls-broken", broken);
    let agent = &node(&[]).await;
    let ns = TestNamespace::new("pulls-compile").await;
    ns.create_bound_pod(agent, "broken", serde_json::json!({}), serde_json::json!({"restartPolicy": "Always", "containers": [{"name": "c", "image": image}]})).await;

    // Three attempts to create the container (the first and two back-offs, 10 s and 20 s).
    let events: kube::Api<Event> = kube::Api::namespaced(ns.client.clone(), &ns.name);
    let attempts = || async {
        let list = events.list(&Default::default()).await.ok()?;
        let n: i32 = list
            .items
            .iter()
            .filter(|e| {
                e.involved_object.name.as_deref() == Some("broken")
                    && e.reason.as_deref() == Some("Failed")
                    && e.message
                        .as_deref()
                        .is_some_and(|m| m.starts_with("Error: "))
            })
            .map(|e| e.count.unwrap_or(1))
            .sum();
        Some(n)
    };
    wait_for(
        "three failed attempts to create the container",
        Duration::from_secs(120),
        || async { attempts().await.filter(|n| *n >= 3) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    let pod = ns.pods().get("broken").await.unwrap();
    let (reason, message) = waiting(&pod).unwrap_or_default();
    assert_eq!(reason, "CreateContainerError", "{message}");
    assert!(
        message.contains("compil"),
        "the compiler's error: {message}"
    );

    let digest = String::from_utf8_lossy(
        &Command::new("sha256sum")
            .stdin(std::process::Stdio::piped())
            .stdout(std::process::Stdio::piped())
            .spawn()
            .map(|mut c| {
                c.stdin.take().unwrap().write_all(broken).unwrap();
                c.wait_with_output().unwrap().stdout
            })
            .unwrap(),
    )
    .split_whitespace()
    .next()
    .unwrap()
    .to_string();
    let log = agent.log();
    let compilations = log
        .lines()
        .filter(|l| l.contains("compile: compiling digest=") && l.contains(&digest))
        .count();
    assert_eq!(
        compilations,
        1,
        "one compilation of sha256:{digest} for three attempts; agent log:\n{}",
        agent.log_tail()
    );
}
