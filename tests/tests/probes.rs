//! Probes and lifecycle hooks end to end: `toolbox` pods (wasm-examples) created through the
//! real API server, their readiness, restarts and events read back from it. Exec probes and
//! hooks run the container's module again in its sandbox; HTTP and TCP probes go to a listener
//! this test opens on the agent's node IP (the pod IP is the node IP). One namespace per test.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use integration_tests::{
    example_image, test_node, wait_for, Agent, Cluster, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{ContainerStatus, Pod};
use kube::api::{DeleteParams, PostParams};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

async fn node() -> Agent {
    test_node("probes", &[]).await
}

type Ns = TestNamespace;

/// `toolbox` pods and waiting for events, in the test's namespace.
trait ToolboxPods {
    async fn toolbox_pod(&self, agent: &Agent, name: &str, container: serde_json::Value) -> Pod;
    async fn wait_event(&self, agent: &Agent, pod: &str, reason: &str, contains: &str) -> String;
}

impl ToolboxPods for Ns {
    /// A `toolbox` pod that keeps running (`sleep 3600`) with an emptyDir at /data; `container`
    /// is merged into its one container (probes, lifecycle).
    async fn toolbox_pod(&self, agent: &Agent, name: &str, container: serde_json::Value) -> Pod {
        let mut c = serde_json::json!({
            "name": "toolbox", "image": example_image("toolbox"), "command": ["sleep", "3600"],
            "volumeMounts": [{"name": "data", "mountPath": "/data"}],
        });
        c.as_object_mut()
            .unwrap()
            .extend(container.as_object().unwrap().clone());
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": agent.name, "restartPolicy": "Always", "terminationGracePeriodSeconds": 1,
                "tolerations": [{"operator": "Exists"}],
                "volumes": [{"name": "data", "emptyDir": {}}],
                "containers": [c],
            }
        }))
        .unwrap();
        self.pods()
            .create(&PostParams::default(), &pod)
            .await
            .unwrap()
    }

    /// Waits for an event about `pod` with this reason whose message contains `contains`.
    async fn wait_event(&self, agent: &Agent, pod: &str, reason: &str, contains: &str) -> String {
        let result = wait_for(
            &format!("event {reason} ({contains})"),
            TEST_TIMEOUT,
            || async {
                self.events(pod)
                    .await
                    .into_iter()
                    .find(|(r, m)| r == reason && m.contains(contains))
                    .map(|(_, m)| m)
            },
        )
        .await;
        match result {
            Ok(message) => message,
            Err(e) => {
                let events = self.events(pod).await;
                panic!("{e}\nevents: {events:#?}\nagent log:\n{}", agent.log_tail())
            }
        }
    }
}

fn status(pod: &Pod) -> Option<&ContainerStatus> {
    pod.status.as_ref()?.container_statuses.as_ref()?.first()
}

fn running(pod: &Pod) -> bool {
    status(pod)
        .and_then(|s| s.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

fn condition(pod: &Pod, kind: &str) -> Option<String> {
    pod.status
        .as_ref()?
        .conditions
        .as_ref()?
        .iter()
        .find(|c| c.type_ == kind)
        .map(|c| c.status.clone())
}

fn pod_ready(pod: &Pod) -> bool {
    condition(pod, "Ready").as_deref() == Some("True")
        && condition(pod, "ContainersReady").as_deref() == Some("True")
}

fn restarts(pod: &Pod) -> i32 {
    status(pod).map_or(0, |s| s.restart_count)
}

fn kubectl_exec(ns: &str, args: &[&str]) -> (i32, String) {
    let out = Cluster::get()
        .kubectl()
        .args(["exec", "-n", ns])
        .args(args)
        .output()
        .expect("kubectl runs");
    (
        out.status.code().unwrap_or(-1),
        format!(
            "{}{}",
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        ),
    )
}

#[tokio::test]
async fn readiness_exec_probe_gates_ready_until_the_file_exists() {
    let agent = &node().await;
    let ns = Ns::new("ready-exec").await;
    ns.toolbox_pod(agent, "gated", serde_json::json!({"readinessProbe": {"exec": {"command": ["test", "-e", "/data/ready"]}, "periodSeconds": 1}})).await;

    // Running, probed (the Unhealthy event says so), and not ready.
    ns.wait_pod(agent, "gated", "the container to run", running)
        .await;
    let message = ns
        .wait_event(agent, "gated", "Unhealthy", "Readiness probe failed")
        .await;
    assert!(message.starts_with("Readiness probe failed: "), "{message}");
    // The event and the status come from different writers: wait until the status carries the
    // fields asserted (the readiness probe cannot pass before the file exists).
    let pod = ns
        .wait_pod(
            agent,
            "gated",
            "the status with started and both readiness conditions",
            |p| {
                running(p)
                    && status(p).is_some_and(|s| s.started.is_some())
                    && condition(p, "Ready").is_some()
                    && condition(p, "ContainersReady").is_some()
            },
        )
        .await;
    assert!(
        running(&pod) && !status(&pod).unwrap().ready,
        "running but not ready: {:?}",
        pod.status
    );
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));
    assert_eq!(condition(&pod, "ContainersReady").as_deref(), Some("False"));
    assert_eq!(
        status(&pod).unwrap().started,
        Some(true),
        "no startup probe: started when running"
    );

    let (code, out) = kubectl_exec(&ns.name, &["gated", "--", "write", "/data/ready", "yes"]);
    assert_eq!(code, 0, "{out}");
    let pod = ns
        .wait_pod(agent, "gated", "the pod to become Ready", pod_ready)
        .await;
    assert!(status(&pod).unwrap().ready);
    assert_eq!(restarts(&pod), 0, "readiness never restarts");
}

#[tokio::test]
async fn failing_liveness_probe_restarts_the_container() {
    let agent = &node().await;
    let ns = Ns::new("liveness").await;
    ns.toolbox_pod(agent, "doomed", serde_json::json!({"livenessProbe": {"exec": {"command": ["false"]}, "periodSeconds": 1, "failureThreshold": 1}})).await;

    let pod = ns
        .wait_pod(
            agent,
            "doomed",
            "a restart after the liveness failure",
            |p| restarts(p) >= 1,
        )
        .await;
    let last = status(&pod)
        .unwrap()
        .last_state
        .as_ref()
        .and_then(|s| s.terminated.as_ref())
        .expect("lastState.terminated after a liveness kill");
    assert_ne!(
        last.exit_code, 0,
        "a killed container did not succeed: {last:?}"
    );
    let unhealthy = ns
        .wait_event(agent, "doomed", "Unhealthy", "Liveness probe failed")
        .await;
    assert!(
        unhealthy.starts_with("Liveness probe failed: "),
        "{unhealthy}"
    );
    ns.wait_event(
        agent,
        "doomed",
        "Killing",
        "Container toolbox failed liveness probe, will be restarted",
    )
    .await;
}

#[tokio::test]
async fn startup_probe_that_never_succeeds_restarts_and_gates_readiness() {
    let agent = &node().await;
    let ns = Ns::new("startup").await;
    ns.toolbox_pod(
        agent,
        "slow",
        serde_json::json!({
            "startupProbe": {"exec": {"command": ["test", "-e", "/data/never"]}, "periodSeconds": 1, "failureThreshold": 2},
            // Would pass at once: it must not run, and the container must not be ready, before startup succeeds.
            "readinessProbe": {"exec": {"command": ["true"]}, "periodSeconds": 1},
        }),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "slow", "the container to run", |p| {
            running(p) && status(p).is_some_and(|s| s.started.is_some())
        })
        .await;
    assert_eq!(status(&pod).unwrap().started, Some(false));
    let pod = ns
        .wait_pod(agent, "slow", "a restart after the startup failure", |p| {
            restarts(p) >= 1
        })
        .await;
    assert!(!pod_ready(&pod));
    ns.wait_event(agent, "slow", "Unhealthy", "Startup probe failed")
        .await;
    ns.wait_event(
        agent,
        "slow",
        "Killing",
        "Container toolbox failed startup probe, will be restarted",
    )
    .await;
    let events = ns.events("slow").await;
    assert!(
        !events.iter().any(|(_, m)| m.starts_with("Readiness probe")),
        "readiness ran before startup succeeded: {events:?}"
    );
}

#[tokio::test]
async fn post_start_hook_runs_before_readiness() {
    let agent = &node().await;
    let ns = Ns::new("poststart").await;
    ns.toolbox_pod(
        agent,
        "hooked",
        serde_json::json!({
            "lifecycle": {"postStart": {"exec": {"command": ["write", "/data/hook", "ran"]}}},
            "readinessProbe": {"exec": {"command": ["test", "-e", "/data/hook"]}, "periodSeconds": 1},
        }),
    )
    .await;
    let pod = ns
        .wait_pod(agent, "hooked", "the pod to become Ready", pod_ready)
        .await;
    assert_eq!(restarts(&pod), 0);
    let (code, out) = kubectl_exec(&ns.name, &["hooked", "--", "cat", "/data/hook"]);
    assert_eq!((code, out.trim()), (0, "ran"));

    // A failing postStart kills the container: FailedPostStartHook, then a restart.
    ns.toolbox_pod(
        agent,
        "badhook",
        serde_json::json!({"lifecycle": {"postStart": {"exec": {"command": ["false"]}}}}),
    )
    .await;
    ns.wait_event(
        agent,
        "badhook",
        "FailedPostStartHook",
        "PostStartHook failed",
    )
    .await;
    ns.wait_pod(agent, "badhook", "a restart after the failed hook", |p| {
        restarts(p) >= 1
    })
    .await;
}

/// A tiny HTTP server on the node IP: answers 200 while `healthy`, else 500, and remembers
/// the request lines it saw.
struct Listener {
    port: u16,
    healthy: Arc<AtomicBool>,
    seen: Arc<Mutex<Vec<String>>>,
}

impl Listener {
    async fn start(ip: &str) -> Listener {
        let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
        let port = listener.local_addr().unwrap().port();
        let healthy = Arc::new(AtomicBool::new(true));
        let seen = Arc::new(Mutex::new(Vec::new()));
        let (h, s) = (healthy.clone(), seen.clone());
        tokio::spawn(async move {
            while let Ok((mut conn, _)) = listener.accept().await {
                let (h, s) = (h.clone(), s.clone());
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 4096];
                    let n = conn.read(&mut buf).await.unwrap_or(0);
                    if n == 0 {
                        return; // a TCP probe: connect and close
                    }
                    let line = String::from_utf8_lossy(&buf[..n])
                        .lines()
                        .next()
                        .unwrap_or_default()
                        .to_string();
                    s.lock().unwrap().push(line);
                    let status = if h.load(Ordering::SeqCst) {
                        "200 OK"
                    } else {
                        "500 Internal Server Error"
                    };
                    let _ = conn.write_all(format!("HTTP/1.1 {status}\r\nContent-Length: 0\r\nConnection: close\r\n\r\n").as_bytes()).await;
                });
            }
        });
        Listener {
            port,
            healthy,
            seen,
        }
    }

    fn saw(&self, path: &str) -> bool {
        self.seen
            .lock()
            .unwrap()
            .iter()
            .any(|l| l.starts_with(&format!("GET {path} ")))
    }
}

#[tokio::test]
async fn http_and_tcp_probes_against_the_pod_ip_and_a_pre_stop_hook() {
    let agent = &node().await;
    let ns = Ns::new("http").await;
    let listener = Listener::start(&agent.node_ip).await;
    ns.toolbox_pod(
        agent,
        "web",
        serde_json::json!({
            "ports": [{"name": "http", "containerPort": listener.port}],
            "startupProbe": {"tcpSocket": {"port": listener.port}, "periodSeconds": 1},
            "readinessProbe": {"httpGet": {"port": "http", "path": "/healthz", "httpHeaders": [{"name": "X-Probe", "value": "yes"}]}, "periodSeconds": 1, "failureThreshold": 1},
            "lifecycle": {"preStop": {"httpGet": {"port": listener.port, "path": "/prestop"}}},
        }),
    )
    .await;
    ns.wait_pod(agent, "web", "the pod to become Ready", pod_ready)
        .await;
    assert!(listener.saw("/healthz"));

    // Readiness follows the endpoint both ways.
    listener.healthy.store(false, Ordering::SeqCst);
    let pod = ns
        .wait_pod(agent, "web", "the pod to become unready", |p| {
            condition(p, "Ready").as_deref() == Some("False")
        })
        .await;
    assert!(
        running(&pod) && restarts(&pod) == 0,
        "readiness does not restart"
    );
    ns.wait_event(
        agent,
        "web",
        "Unhealthy",
        "Readiness probe failed: HTTP probe failed with statuscode: 500",
    )
    .await;
    listener.healthy.store(true, Ordering::SeqCst);
    ns.wait_pod(agent, "web", "the pod to become Ready again", pod_ready)
        .await;

    // Deleting the pod runs its preStop hook before the container stops.
    ns.pods()
        .delete("web", &DeleteParams::default())
        .await
        .unwrap();
    wait_for("the preStop request", TEST_TIMEOUT, || async {
        listener.saw("/prestop").then_some(())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
}

/// A grpc.health.v1 server over h2c on `ip`, answering SERVING while `serving` is set and
/// NOT_SERVING otherwise; the request and response messages are encoded by hand.
async fn grpc_health_server(ip: &str, serving: Arc<AtomicBool>) -> u16 {
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let serving = serving.clone();
            tokio::spawn(async move {
                let service =
                    hyper::service::service_fn(move |req: http::Request<hyper::body::Incoming>| {
                        let status: u8 = if serving.load(Ordering::SeqCst) { 1 } else { 2 };
                        async move {
                            let ok = req.uri().path() == "/grpc.health.v1.Health/Check";
                            let mut trailers = http::HeaderMap::new();
                            trailers.insert(
                                "grpc-status",
                                http::HeaderValue::from_static(if ok { "0" } else { "12" }),
                            );
                            let message = if ok {
                                vec![0, 0, 0, 0, 2, 0x08, status]
                            } else {
                                Vec::new()
                            };
                            let frames = vec![
                                Ok::<_, std::convert::Infallible>(hyper::body::Frame::data(
                                    bytes::Bytes::from(message),
                                )),
                                Ok(hyper::body::Frame::trailers(trailers)),
                            ];
                            let body =
                                http_body_util::StreamBody::new(futures::stream::iter(frames));
                            Ok::<_, std::convert::Infallible>(
                                http::Response::builder()
                                    .header("content-type", "application/grpc")
                                    .body(body)
                                    .unwrap(),
                            )
                        }
                    });
                let _ =
                    hyper::server::conn::http2::Builder::new(hyper_util::rt::TokioExecutor::new())
                        .serve_connection(hyper_util::rt::TokioIo::new(tcp), service)
                        .await;
            });
        }
    });
    port
}

/// An HTTPS server on `ip` with a certificate no one trusts (the cluster admin's client
/// certificate): 200 to every request. Returns its port.
async fn https_server(ip: &str) -> u16 {
    use rustls_pki_types::pem::PemObject;
    let pki = std::path::Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
    let certs = rustls_pki_types::CertificateDer::pem_file_iter(pki.join("admin.crt"))
        .unwrap()
        .collect::<Result<Vec<_>, _>>()
        .unwrap();
    let key = rustls_pki_types::PrivateKeyDer::from_pem_file(pki.join("admin.key")).unwrap();
    let config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()
    .unwrap()
    .with_no_client_auth()
    .with_single_cert(certs, key)
    .unwrap();
    let acceptor = tokio_rustls::TlsAcceptor::from(Arc::new(config));
    let listener = tokio::net::TcpListener::bind((ip, 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((tcp, _)) = listener.accept().await {
            let acceptor = acceptor.clone();
            tokio::spawn(async move {
                let Ok(mut tls) = acceptor.accept(tcp).await else {
                    return;
                };
                let mut buf = vec![0u8; 4096];
                let _ = tls.read(&mut buf).await;
                let _ = tls
                    .write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nConnection: close\r\n\r\n")
                    .await;
                let _ = tls.shutdown().await;
            });
        }
    });
    port
}

#[tokio::test]
async fn https_startup_and_grpc_readiness_probes_and_their_metrics() {
    let agent = &node().await;
    let ns = Ns::new("grpc-https").await;
    let serving = Arc::new(AtomicBool::new(false));
    let grpc = grpc_health_server(&agent.node_ip, serving.clone()).await;
    let https = https_server(&agent.node_ip).await;
    ns.toolbox_pod(
        agent,
        "checked",
        serde_json::json!({
            "startupProbe": {"httpGet": {"port": https, "scheme": "HTTPS", "path": "/started"}, "periodSeconds": 1},
            "readinessProbe": {"grpc": {"port": grpc}, "periodSeconds": 1},
        }),
    )
    .await;

    // The HTTPS startup probe passes against an untrusted certificate; the gRPC readiness
    // probe then sees NOT_SERVING.
    let message = ns
        .wait_event(agent, "checked", "Unhealthy", "Readiness probe failed")
        .await;
    assert_eq!(
        message,
        "Readiness probe failed: service unhealthy (responded with \"NOT_SERVING\")"
    );
    // The readiness probe runs only after startup succeeded, but the status manager may write
    // `started` after the event is out: wait for it rather than expect it with the event.
    let pod = ns
        .wait_pod(
            agent,
            "checked",
            "started: true after the HTTPS startup probe succeeded",
            |p| status(p).is_some_and(|s| s.started == Some(true)),
        )
        .await;
    assert_eq!(condition(&pod, "Ready").as_deref(), Some("False"));

    serving.store(true, Ordering::SeqCst);
    ns.wait_pod(
        agent,
        "checked",
        "the pod to become Ready on SERVING",
        pod_ready,
    )
    .await;
    serving.store(false, Ordering::SeqCst);
    ns.wait_pod(
        agent,
        "checked",
        "the pod to turn not Ready on NOT_SERVING",
        |p| condition(p, "Ready").as_deref() == Some("False"),
    )
    .await;

    // /metrics/probes on the kubelet API counts both probes by result.
    let pki = std::path::Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
    let out = std::process::Command::new("curl")
        .args(["-sk", "--max-time", "20", "--cert"])
        .arg(pki.join("admin.crt"))
        .arg("--key")
        .arg(pki.join("admin.key"))
        .arg(format!("https://{}:10250/metrics/probes", agent.node_ip))
        .output()
        .expect("curl runs");
    let metrics = String::from_utf8_lossy(&out.stdout);
    let series = |kind: &str, result: &str| {
        let prefix = format!("prober_probe_total{{probe_type=\"{kind}\",result=\"{result}\",container=\"toolbox\",pod=\"checked\",namespace=\"{}\",pod_uid=", ns.name);
        metrics
            .lines()
            .find(|l| l.starts_with(&prefix))
            .and_then(|l| l.rsplit(' ').next()?.parse::<f64>().ok())
            .unwrap_or(0.0)
    };
    assert!(series("Startup", "successful") >= 1.0, "{metrics}");
    assert!(
        series("Readiness", "successful") >= 1.0 && series("Readiness", "failed") >= 2.0,
        "{metrics}"
    );
}
