//! The kubectl verbs on a Linux container pod (busybox on containerd, issue #14), through the
//! real API server and kubectl, as tests/tests/server.rs, http.rs and sandbox_net.rs check them
//! on Wasm pods: exec (stdin, exit codes, a container that is not running), attach, logs (-f,
//! --previous), port-forward (into the pod's own network namespace only), `kubectl top`, and
//! probes that target the pod's own IP.
//!
//! Network safety: each test's mixed node has a pod CIDR no route of this host covers and a
//! network that does not route ([`MixedNode`]); the only traffic is to loopback (kubectl's
//! forwarded port, a listener the test opens on the host's 127.0.0.1) and, from the agent, to
//! the test's pods in namespaces the agent made.

use std::io::{BufRead, Read, Write};
use std::process::Stdio;
use std::sync::atomic::Ordering;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use integration_tests::mixed_node::{pod_ip, MixedNode};
use integration_tests::port_forward::{secret_listener, PortForward};
use integration_tests::{phase, wait_for, Agent, Cluster, TestNamespace, TEST_TIMEOUT};
use k8s_openapi::api::core::v1::Pod;

/// What the busybox `httpd` pods here serve (a file the container writes, so a reply names it).
const SERVED: &str = "served-from-inside-the-pod";

/// `sh -c` that writes [`SERVED`] as /www/index.html and runs httpd on `port` in the foreground.
fn httpd(port: u16) -> String {
    format!("mkdir -p /www && echo {SERVED} > /www/index.html && exec httpd -f -p {port} -h /www")
}

/// A busybox container `name` running `script` with `sh -c`; `extra` merged over it.
fn container(name: &str, script: &str, extra: serde_json::Value) -> serde_json::Value {
    let mut c = serde_json::json!({
        "name": name,
        "image": MixedNode::busybox(),
        "command": ["sh", "-c", script],
    });
    if let (Some(c), serde_json::Value::Object(extra)) = (c.as_object_mut(), extra) {
        c.extend(extra);
    }
    c
}

/// Whether container `name` of the pod is running.
fn is_running(pod: &Pod, name: &str) -> bool {
    status_of(pod, name)
        .and_then(|c| c.state.as_ref())
        .is_some_and(|s| s.running.is_some())
}

fn status_of<'a>(
    pod: &'a Pod,
    name: &str,
) -> Option<&'a k8s_openapi::api::core::v1::ContainerStatus> {
    pod.status
        .as_ref()?
        .container_statuses
        .as_ref()?
        .iter()
        .find(|c| c.name == name)
}

fn restarts(pod: &Pod, name: &str) -> i32 {
    status_of(pod, name).map_or(0, |c| c.restart_count)
}

fn is_ready(pod: &Pod) -> bool {
    pod.status
        .as_ref()
        .and_then(|s| s.conditions.as_ref())
        .is_some_and(|cs| cs.iter().any(|c| c.type_ == "Ready" && c.status == "True"))
}

/// `kubectl -n ns <args>` with `stdin`: (exit code, stdout, stderr).
fn kubectl(ns: &str, args: &[&str], stdin: &[u8]) -> (i32, String, String) {
    let mut child = Cluster::get()
        .kubectl()
        .args(["-n", ns])
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    let mut pipe = child.stdin.take().expect("stdin");
    pipe.write_all(stdin).expect("stdin written");
    drop(pipe);
    let out = child.wait_with_output().expect("kubectl ends");
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
}

/// A running kubectl whose stdout (and stderr) are collected as they come; killed when dropped.
struct Streaming {
    child: std::process::Child,
    out: Arc<Mutex<String>>,
}

impl Streaming {
    fn start(ns: &str, args: &[&str]) -> Streaming {
        let mut child = Cluster::get()
            .kubectl()
            .args(["-n", ns])
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        let out = Arc::new(Mutex::new(String::new()));
        for pipe in [
            Box::new(child.stdout.take().expect("stdout")) as Box<dyn Read + Send>,
            Box::new(child.stderr.take().expect("stderr")),
        ] {
            let out = out.clone();
            std::thread::spawn(move || {
                for line in std::io::BufReader::new(pipe).lines() {
                    let Ok(line) = line else { return };
                    let mut out = out.lock().unwrap();
                    out.push_str(&line);
                    out.push('\n');
                }
            });
        }
        Streaming { child, out }
    }

    fn output(&self) -> String {
        self.out.lock().unwrap().clone()
    }

    fn send(&mut self, line: &str) {
        if let Some(stdin) = self.child.stdin.as_mut() {
            let _ = stdin.write_all(line.as_bytes());
            let _ = stdin.flush();
        }
    }

    async fn wait_output(&self, what: &str, want: &str, agent: &Agent) {
        wait_for(what, TEST_TIMEOUT, || async {
            self.output().contains(want).then_some(())
        })
        .await
        .unwrap_or_else(|e| {
            panic!(
                "{e}\nkubectl said: {}\nagent log:\n{}",
                self.output(),
                agent.log_tail()
            )
        });
    }
}

impl Drop for Streaming {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Starts `node`'s pod `name` with `spec` and waits until its containers `running` run.
async fn run_pod(
    node: &MixedNode,
    ns: &TestNamespace,
    name: &str,
    spec: serde_json::Value,
    running: &[&str],
) -> Pod {
    ns.create_bound_pod(&node.agent, name, serde_json::json!({}), spec)
        .await;
    ns.wait_pod(&node.agent, name, "the container pod to run", |p| {
        running.iter().all(|c| is_running(p, c))
    })
    .await
}

#[tokio::test]
async fn exec_into_a_container_with_stdin_and_exit_codes() {
    let node = MixedNode::start("verbs-exec", &[]).await;
    let ns = TestNamespace::new("verbs-exec").await;
    // "done" ends at once; "Never" keeps it ended while "box" runs (the pod stays Running).
    run_pod(
        &node,
        &ns,
        "box",
        serde_json::json!({"containers": [
            container("box", "exec sleep 3600", serde_json::json!({})),
            container("done", "exit 0", serde_json::json!({})),
        ]}),
        &["box"],
    )
    .await;

    let (code, out, err) = kubectl(
        &ns.name,
        &["exec", "-i", "box", "-c", "box", "--", "cat"],
        b"hello from the test\nsecond line\n",
    );
    assert_eq!(code, 0, "exec -i cat: {err}");
    assert_eq!(out, "hello from the test\nsecond line\n", "{err}");

    let (code, _, err) = kubectl(
        &ns.name,
        &["exec", "box", "-c", "box", "--", "sh", "-c", "exit 7"],
        b"",
    );
    assert_eq!(code, 7, "kubectl exits with the command's code: {err}");
    let (code, out, err) = kubectl(
        &ns.name,
        &[
            "exec",
            "box",
            "-c",
            "box",
            "--",
            "sh",
            "-c",
            "echo out; echo err >&2; exit 3",
        ],
        b"",
    );
    assert_eq!((code, out.as_str()), (3, "out\n"), "{err}");
    assert!(err.contains("err"), "{err}");

    // The exec runs in the container, not on the node: its hostname is the pod's.
    let (code, out, err) = kubectl(
        &ns.name,
        &["exec", "box", "-c", "box", "--", "hostname"],
        b"",
    );
    assert_eq!((code, out.trim()), (0, "box"), "{err}");

    // A program the image does not have, and a container that is not running: clear errors.
    let (code, _, err) = kubectl(
        &ns.name,
        &["exec", "box", "-c", "box", "--", "no-such-program"],
        b"",
    );
    assert_ne!(code, 0);
    assert!(err.contains("no-such-program"), "{err}");
    ns.wait_pod(&node.agent, "box", "the done container to end", |p| {
        status_of(p, "done")
            .and_then(|c| c.state.as_ref())
            .is_some_and(|s| s.terminated.is_some())
    })
    .await;
    let (code, out, err) = kubectl(&ns.name, &["exec", "box", "-c", "done", "--", "true"], b"");
    assert_ne!(code, 0, "exec into an ended container: {out}");
    assert!(
        err.contains("not running") || err.contains("not found"),
        "one clear line: {err}"
    );
}

#[tokio::test]
async fn attach_to_a_container_with_stdin() {
    let node = MixedNode::start("verbs-attach", &[]).await;
    let ns = TestNamespace::new("verbs-attach").await;
    run_pod(
        &node,
        &ns,
        "reader",
        serde_json::json!({"containers": [container(
            "reader",
            "echo ready; while read l; do echo got:$l; done",
            serde_json::json!({"stdin": true}),
        )]}),
        &["reader"],
    )
    .await;
    let mut attach = Streaming::start(&ns.name, &["attach", "-i", "reader", "-c", "reader"]);
    // Lines sent before the stream is up may reach the container before this client sees its
    // output: send until an answer comes back through the attached stream.
    wait_for("an answer through kubectl attach", TEST_TIMEOUT, || {
        attach.send("ping\n");
        let seen = attach.output().contains("got:ping");
        async move { seen.then_some(()) }
    })
    .await
    .unwrap_or_else(|e| {
        panic!(
            "{e}\nkubectl said: {}\nagent log:\n{}",
            attach.output(),
            node.agent.log_tail()
        )
    });
    // The log has the container's output too (attach reads it as it goes to the log).
    let (_, logs, _) = kubectl(&ns.name, &["logs", "reader"], b"");
    assert!(
        logs.contains("ready") && logs.contains("got:ping"),
        "{logs}"
    );
}

#[tokio::test]
async fn logs_follow_and_previous() {
    let node = MixedNode::start("verbs-logs", &[]).await;
    let ns = TestNamespace::new("verbs-logs").await;
    // The first run ends (exit 1) after a line; the restarted one stays, printing "second"
    // once the test touches /tmp/go. The emptyDir says which run this is.
    let script = "if [ -f /state/ran ]; then echo second-run; \
                  while :; do if [ -f /tmp/go ]; then echo after-follow; rm /tmp/go; fi; sleep 0.2; done; \
                  fi; touch /state/ran; echo first-run; exit 1";
    run_pod(
        &node,
        &ns,
        "logger",
        serde_json::json!({
            "restartPolicy": "Always",
            "volumes": [{"name": "state", "emptyDir": {}}],
            "containers": [container("logger", script, serde_json::json!({
                "volumeMounts": [{"name": "state", "mountPath": "/state"}],
            }))],
        }),
        &[],
    )
    .await;
    ns.wait_pod(
        &node.agent,
        "logger",
        "the container to restart once",
        |p| restarts(p, "logger") >= 1 && is_running(p, "logger"),
    )
    .await;
    let (code, current, err) = kubectl(&ns.name, &["logs", "logger"], b"");
    assert_eq!(code, 0, "{err}");
    assert!(
        current.contains("second-run") && !current.contains("first-run"),
        "{current}"
    );
    let (code, previous, err) = kubectl(&ns.name, &["logs", "logger", "--previous"], b"");
    assert_eq!(code, 0, "{err}");
    assert_eq!(previous, "first-run\n", "{err}");

    let follow = Streaming::start(&ns.name, &["logs", "-f", "logger"]);
    follow
        .wait_output("logs -f to print the log so far", "second-run", &node.agent)
        .await;
    let (code, _, err) = kubectl(&ns.name, &["exec", "logger", "--", "touch", "/tmp/go"], b"");
    assert_eq!(code, 0, "{err}");
    follow
        .wait_output(
            "logs -f to see a line written after it started",
            "after-follow",
            &node.agent,
        )
        .await;
}

/// The sandbox bar for port-forward on a container pod: the pod's localhost is its own. A
/// namespace user forwarding to a port the container does not serve gets kubectl's error, and
/// never the listener the HOST has on 127.0.0.1 at that port (a node daemon, etcd).
#[tokio::test]
async fn port_forward_never_reaches_the_hosts_loopback() {
    const SECRET: &str = "host-loopback-secret-the-pod-must-not-see";
    let node = MixedNode::start("verbs-pf-host", &[]).await;
    let ns = TestNamespace::new("verbs-pf-host").await;
    let (held, accepted) = secret_listener("127.0.0.1", SECRET).await;
    run_pod(
        &node,
        &ns,
        "web",
        serde_json::json!({"containers": [container("web", &httpd(8080), serde_json::json!({
            "ports": [{"containerPort": 8080}, {"containerPort": held}],
        }))]}),
        &["web"],
    )
    .await;
    let forward = PortForward::start(&ns.name, "web", held).await;
    let got = forward
        .exchange(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
        .await;
    let stderr = forward.stop();
    assert!(
        !got.contains(SECRET),
        "port-forward to web:{held} read the host's 127.0.0.1:{held}: {got:?}"
    );
    assert!(
        stderr.contains(&format!("localhost:{held}")),
        "kubectl says why: {stderr}"
    );
    assert_eq!(
        accepted.load(Ordering::SeqCst),
        0,
        "the host's listener was dialled"
    );
}

#[tokio::test]
async fn port_forward_reaches_httpd_in_the_container() {
    let node = MixedNode::start("verbs-pf", &[]).await;
    let ns = TestNamespace::new("verbs-pf").await;
    run_pod(
        &node,
        &ns,
        "web",
        serde_json::json!({"containers": [container("web", &httpd(8080), serde_json::json!({
            "ports": [{"containerPort": 8080}],
        }))]}),
        &["web"],
    )
    .await;
    let forward = PortForward::start(&ns.name, "web", 8080).await;
    // httpd may still be starting when the container is Running.
    let got = wait_for(
        "httpd's file through port-forward",
        TEST_TIMEOUT,
        || async {
            let got = forward
                .exchange(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                .await;
            got.contains(SERVED).then_some(got)
        },
    )
    .await;
    let got = match got {
        Ok(got) => got,
        Err(e) => panic!(
            "{e}\nkubectl: {}\nagent log:\n{}",
            forward.stop(),
            node.agent.log_tail()
        ),
    };
    assert!(
        got.starts_with("HTTP/1.0 200") || got.starts_with("HTTP/1.1 200"),
        "{got}"
    );
}

#[tokio::test]
async fn kubectl_top_shows_the_container_pod() {
    let node = MixedNode::start("verbs-top", &["--housekeeping-interval=1s"]).await;
    let ns = TestNamespace::new("verbs-top").await;
    // A 16 MiB string held by the shell, and a busy loop.
    let script = "x=$(head -c 16777216 /dev/zero | tr '\\0' a); while :; do :; done";
    run_pod(
        &node,
        &ns,
        "spin",
        serde_json::json!({"containers": [container("spin", script, serde_json::json!({}))]}),
        &["spin"],
    )
    .await;
    let top = || {
        let out = Cluster::get()
            .kubectl()
            .args(["top", "pod", "-n", &ns.name, "spin", "--no-headers"])
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // metrics-server scrapes every 15 s and needs two scrapes for a rate; the string may
    // still be building at the first.
    let line = wait_for(
        "kubectl top pod to show the container's CPU and memory",
        Duration::from_secs(150),
        || async {
            let line = top()?;
            let fields: Vec<&str> = line.split_whitespace().collect();
            let millicores: u64 = fields.get(1)?.strip_suffix('m')?.parse().ok()?;
            let mebibytes: u64 = fields.get(2)?.strip_suffix("Mi")?.parse().ok()?;
            (millicores >= 100 && mebibytes >= 16).then_some(line)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\nlast: {:?}\n{}", top(), node.agent.log_tail()));
    assert!(line.starts_with("spin"), "{line}");
}

#[tokio::test]
async fn probes_target_the_pods_own_ip() {
    let node = MixedNode::start("verbs-probes", &[]).await;
    let ns = TestNamespace::new("verbs-probes").await;
    let web = container(
        "web",
        &format!("touch /tmp/ok && {}", httpd(8080)),
        serde_json::json!({
            "readinessProbe": {"httpGet": {"path": "/index.html", "port": 8080}, "periodSeconds": 1},
            "livenessProbe": {
                "exec": {"command": ["test", "-f", "/tmp/ok"]},
                "periodSeconds": 1, "failureThreshold": 1,
            },
        }),
    );
    let tcp = container(
        "tcp",
        &httpd(9090),
        serde_json::json!({
            "readinessProbe": {"tcpSocket": {"port": 9090}, "periodSeconds": 1},
        }),
    );
    ns.create_bound_pod(
        &node.agent,
        "probed",
        serde_json::json!({}),
        serde_json::json!({"restartPolicy": "Always", "containers": [web, tcp]}),
    )
    .await;
    // Nothing listens on 8080 or 9090 at the node IP: Ready only if the probes reach the pod.
    let pod = ns
        .wait_pod(
            &node.agent,
            "probed",
            "the pod Ready by its httpGet and tcpSocket probes",
            is_ready,
        )
        .await;
    let ip = pod_ip(&pod).expect("pod IP");
    assert_ne!(ip, node.agent.node_ip);
    assert_eq!(restarts(&pod, "web"), 0);

    // The exec liveness probe starts failing: the container is restarted.
    let (code, _, err) = kubectl(
        &ns.name,
        &["exec", "probed", "-c", "web", "--", "rm", "/tmp/ok"],
        b"",
    );
    assert_eq!(code, 0, "{err}");
    ns.wait_pod(
        &node.agent,
        "probed",
        "the liveness probe to restart web",
        |p| restarts(p, "web") >= 1,
    )
    .await;
    ns.wait_pod(
        &node.agent,
        "probed",
        "Ready again after the restart",
        |p| is_ready(p) && phase(p) == "Running",
    )
    .await;
    let events = ns.event_reasons("probed").await;
    assert!(events.iter().any(|r| r == "Unhealthy"), "{events:?}");
}

/// A hostNetwork container pod's localhost is the node's: port-forward reaches its httpd, which
/// listens on the node's 127.0.0.1 only (loopback, nothing beyond).
#[tokio::test]
async fn port_forward_to_a_host_network_pod() {
    let node = MixedNode::start("verbs-pf-hostnet", &[]).await;
    let ns = TestNamespace::new("verbs-pf-hostnet").await;
    // A port free on the host's loopback now (the pod binds it next).
    let port = std::net::TcpListener::bind(("127.0.0.1", 0))
        .and_then(|l| l.local_addr())
        .expect("a free port")
        .port();
    let script = format!(
        "mkdir -p /www && echo {SERVED} > /www/index.html && exec httpd -f -p 127.0.0.1:{port} -h /www"
    );
    run_pod(
        &node,
        &ns,
        "hostweb",
        serde_json::json!({"hostNetwork": true, "containers": [container("web", &script, serde_json::json!({
            "ports": [{"containerPort": port}],
        }))]}),
        &["web"],
    )
    .await;
    let forward = PortForward::start(&ns.name, "hostweb", port).await;
    let got = wait_for(
        "httpd's file through port-forward",
        TEST_TIMEOUT,
        || async {
            let got = forward
                .exchange(b"GET /index.html HTTP/1.0\r\nHost: x\r\n\r\n")
                .await;
            got.contains(SERVED).then_some(got)
        },
    )
    .await;
    if let Err(e) = got {
        panic!(
            "{e}\nkubectl: {}\nagent log:\n{}",
            forward.stop(),
            node.agent.log_tail()
        );
    }
}
