//! The kubelet API end to end: the real `kubectl logs` through the real API server (which
//! dials the agent's HTTPS port with its kubelet-client certificate and is authorized by
//! SubjectAccessReview), and direct HTTPS requests with curl for authentication and
//! authorization (401 without credentials, 403 for a user without RBAC rights, 200 for the
//! admin). One agent and one namespace per test.

use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::mpsc;
use std::time::Duration;

use integration_tests::{example_image, phase, test_node, wait_for, Agent, Cluster, TestNamespace, TEST_TIMEOUT};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::Api;

async fn node() -> Agent {
    test_node("server", &[]).await
}

type Ns = TestNamespace;

/// Single-container pods and `kubectl logs` in the test's namespace.
trait PodsAndLogs {
    async fn pod(&self, agent: &Agent, name: &str, example: &str, restart: &str);
    fn logs(&self, args: &[&str]) -> (bool, String, String);
    async fn wait_logs(&self, agent: &Agent, args: &[&str], what: &str, check: impl Fn(&str) -> bool) -> String;
}

impl PodsAndLogs for Ns {
    async fn pod(&self, agent: &Agent, name: &str, example: &str, restart: &str) {
        let pod: Pod = serde_json::from_value(serde_json::json!({
            "metadata": {"name": name},
            "spec": {
                "nodeName": agent.name,
                "restartPolicy": restart,
                "terminationGracePeriodSeconds": 2,
                "tolerations": [{"operator": "Exists"}],
                "containers": [{"name": name, "image": example_image(example)}],
            },
        }))
        .unwrap();
        Api::<Pod>::namespaced(self.client.clone(), &self.name).create(&PostParams::default(), &pod).await.unwrap();
    }

    /// `kubectl logs -n <ns> <args>`: (success, stdout, stderr).
    fn logs(&self, args: &[&str]) -> (bool, String, String) {
        let out = Cluster::get().kubectl().args(["logs", "-n", &self.name]).args(args).output().expect("kubectl runs");
        (out.status.success(), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
    }

    /// Waits until `kubectl logs <args>` succeeds with output that passes `check`.
    async fn wait_logs(&self, agent: &Agent, args: &[&str], what: &str, check: impl Fn(&str) -> bool) -> String {
        let result = wait_for(what, TEST_TIMEOUT, || async {
            let (ok, out, _) = self.logs(args);
            (ok && check(&out)).then_some(out)
        })
        .await;
        result.unwrap_or_else(|e| panic!("{e}\nlast try: {:?}\nagent log:\n{}", self.logs(args), agent.log_tail()))
    }
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status.as_ref().and_then(|s| s.container_statuses.as_ref()).and_then(|c| c.first()).map_or(0, |c| c.restart_count)
}

fn tick_numbers(text: &str) -> Vec<u64> {
    text.lines().filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok()).collect()
}

#[tokio::test]
async fn kubectl_logs_of_a_finished_pod_with_options() {
    let agent = &node().await;
    let ns = Ns::new("logs-hello").await;
    ns.pod(agent, "hello", "hello", "Never").await;
    ns.wait_pod(agent, "hello", "hello to succeed", |p| phase(p) == "Succeeded").await;

    let plain = ns.wait_logs(agent, &["hello"], "kubectl logs to show hello's line", |o| o.contains("Hello from WebAssembly!")).await;

    let (ok, stamped, err) = ns.logs(&["hello", "--timestamps"]);
    assert!(ok, "{err}");
    let line = stamped.lines().find(|l| l.contains("Hello from WebAssembly!")).unwrap_or_else(|| panic!("{stamped}"));
    let (stamp, text) = line.split_once(' ').unwrap();
    assert!(stamp.parse::<jiff::Timestamp>().is_ok(), "an RFC 3339 timestamp first: {line:?}");
    assert!(text.starts_with("Hello from WebAssembly!"), "{line:?}");

    let (ok, limited, err) = ns.logs(&["hello", "--limit-bytes=5"]);
    assert!(ok, "{err}");
    assert_eq!(limited, plain[..5], "--limit-bytes cuts the output");

    let (ok, recent, err) = ns.logs(&["hello", "--since=1h"]);
    assert!(ok, "{err}");
    assert!(recent.contains("Hello from WebAssembly!"), "{recent}");
    let future = (jiff::Timestamp::now() + jiff::SignedDuration::from_hours(1)).to_string();
    let (ok, none, err) = ns.logs(&["hello", &format!("--since-time={future}")]);
    assert!(ok, "{err}");
    assert_eq!(none, "", "nothing was written after a time in the future");

    let (ok, _, err) = ns.logs(&["hello", "-c", "nope"]);
    assert!(!ok && err.contains("nope"), "an unknown container is named in the error: {err}");
    let (ok, _, err) = ns.logs(&["hello", "--previous"]);
    assert!(!ok && err.contains("previous terminated container"), "no previous run: {err}");
}

#[tokio::test]
async fn kubectl_logs_tail_and_follow_on_a_ticker() {
    let agent = &node().await;
    let ns = Ns::new("logs-ticker").await;
    ns.pod(agent, "ticker", "ticker", "Always").await;
    ns.wait_logs(agent, &["ticker"], "a few ticks", |o| tick_numbers(o).len() >= 4).await;

    let (ok, tail, err) = ns.logs(&["ticker", "--tail=2"]);
    assert!(ok, "{err}");
    let ticks = tick_numbers(&tail);
    assert_eq!(tail.lines().count(), 2, "--tail=2: {tail:?}");
    assert!(ticks.len() == 2 && ticks[1] == ticks[0] + 1 && ticks[0] >= 3, "the last two ticks: {tail:?}");

    // -f streams ticks written after it started.
    let mut child = Cluster::get()
        .kubectl()
        .args(["logs", "-n", &ns.name, "ticker", "-f", "--tail=1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let stdout = child.stdout.take().unwrap();
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(stdout).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    let first = rx.recv_timeout(TEST_TIMEOUT).expect("kubectl logs -f prints the last tick");
    let first = tick_numbers(&first)[0];
    let mut seen = vec![first];
    while seen.len() < 4 {
        match rx.recv_timeout(TEST_TIMEOUT) {
            Ok(line) => seen.extend(tick_numbers(&line)),
            Err(e) => {
                let _ = child.kill();
                panic!("kubectl logs -f stopped streaming ({e}) after {seen:?}\nagent log:\n{}", agent.log_tail());
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(seen, (first..first + 4).collect::<Vec<_>>(), "new ticks arrive in order");
}

#[tokio::test]
async fn kubectl_logs_previous_shows_the_run_before() {
    let agent = &node().await;
    let ns = Ns::new("logs-crash").await;
    ns.pod(agent, "crash", "crash-looper", "OnFailure").await;
    ns.wait_pod(agent, "crash", "a restart", |p| restart_count(p) >= 1).await;
    let previous = ns.wait_logs(agent, &["crash", "--previous"], "the previous run's log", |o| o.contains("failing on purpose")).await;
    assert_eq!(previous.lines().count(), 1, "one run's output: {previous:?}");
}

/// `curl` to the agent's kubelet API: (HTTP status, body).
fn curl(agent: &Agent, path: &str, cert: Option<(&Path, &Path)>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "--max-time", "20", "-w", "\n%{http_code}"]);
    if let Some((crt, key)) = cert {
        cmd.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    let out = cmd.arg(format!("https://{}:10250{path}", agent.node_ip)).output().expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A client certificate for `cn`, signed by the cluster CA (so it authenticates, and has no
/// RBAC rights).
fn mint_client_cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let pki = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
    let (key, csr, crt) = (dir.join(format!("{cn}.key")), dir.join(format!("{cn}.csr")), dir.join(format!("{cn}.crt")));
    let run = |args: &[&str]| {
        let out = Command::new("openssl").args(args).output().expect("openssl runs");
        assert!(out.status.success(), "openssl {args:?}: {}", String::from_utf8_lossy(&out.stderr));
    };
    let s = |p: &Path| p.display().to_string();
    // Extensions make it X.509 v3, which rustls requires (openssl signs v1 without them).
    let ext = dir.join(format!("{cn}.ext"));
    std::fs::write(&ext, "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n").unwrap();
    run(&["req", "-new", "-newkey", "rsa:2048", "-nodes", "-keyout", &s(&key), "-subj", &format!("/CN={cn}"), "-out", &s(&csr)]);
    run(&[
        "x509", "-req", "-in", &s(&csr), "-CA", &s(&pki.join("ca.crt")), "-CAkey", &s(&pki.join("ca.key")), "-CAcreateserial", "-CAserial",
        &s(&dir.join("ca.srl")), "-days", "1", "-extfile", &s(&ext), "-out", &s(&crt),
    ]);
    (crt, key)
}

#[tokio::test]
async fn direct_requests_are_authenticated_and_authorized() {
    let agent = &node().await;
    let admin = {
        let pki = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
        (pki.join("admin.crt"), pki.join("admin.key"))
    };
    let admin = Some((admin.0.as_path(), admin.1.as_path()));
    // The server is up once the admin gets an answer.
    let (code, body) = wait_for("the kubelet API to answer", TEST_TIMEOUT, || async {
        let (code, body) = curl(agent, "/healthz", admin);
        (code != 0).then_some((code, body))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    assert_eq!((code, body.as_str()), (200, "ok"), "the admin may read /healthz");

    let (code, body) = curl(agent, "/healthz", None);
    assert_eq!(code, 401, "no credentials: {body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!((status["kind"].as_str(), status["reason"].as_str(), status["code"].as_u64()), (Some("Status"), Some("Unauthorized"), Some(401)));

    let (crt, key) = mint_client_cert(&agent.dir, "nobody");
    let (code, body) = curl(agent, "/containerLogs/default/x/y", Some((&crt, &key)));
    assert_eq!(code, 403, "a user without rights: {body}");
    assert!(body.contains("user=nobody") && body.contains("subresource=proxy"), "{body}");

    let (code, body) = curl(agent, "/containerLogs/default/no-such-pod/c", admin);
    assert_eq!(code, 404, "{body}");
    let status: serde_json::Value = serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!((status["reason"].as_str(), status["status"].as_str()), (Some("NotFound"), Some("Failure")));
    let (code, body) = curl(agent, "/containerLogs/default/no-such-pod/c?tailLines=many", admin);
    assert_eq!(code, 400, "a malformed query: {body}");
    let (code, _) = curl(agent, "/containerLogs/default/no-such-pod/c?follow=%ZZ", admin);
    assert_eq!(code, 400, "an undecodable query");
    let (code, _) = curl(agent, "/no/such/path", admin);
    assert_eq!(code, 404);
    // Still serving after all of that.
    assert_eq!(curl(agent, "/healthz", admin).0, 200);
}

/// `kubectl exec -n <ns> <args>` with optional stdin: (exit code, stdout, stderr).
fn kubectl_exec(ns: &str, args: &[&str], stdin: Option<&str>) -> (i32, String, String) {
    use std::io::Write;
    let mut child = Cluster::get()
        .kubectl()
        .args(["exec", "-n", ns])
        .args(args)
        .stdin(if stdin.is_some() { Stdio::piped() } else { Stdio::null() })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (out.status.code().unwrap_or(-1), String::from_utf8_lossy(&out.stdout).into_owned(), String::from_utf8_lossy(&out.stderr).into_owned())
}

#[tokio::test]
async fn kubectl_exec_runs_the_module_again_in_the_sandbox() {
    let agent = &node().await;
    let ns = Ns::new("exec").await;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "toolbox"},
        "spec": {
            "nodeName": agent.name, "restartPolicy": "Always", "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "volumes": [{"name": "data", "emptyDir": {}}],
            "containers": [{
                "name": "toolbox", "image": example_image("toolbox"), "command": ["sleep", "3600"],
                "env": [{"name": "GREETING", "value": "hi"}],
                "volumeMounts": [{"name": "data", "mountPath": "/data"}],
            }],
        },
    }))
    .unwrap();
    Api::<Pod>::namespaced(ns.client.clone(), &ns.name).create(&PostParams::default(), &pod).await.unwrap();
    ns.wait_pod(agent, "toolbox", "the toolbox to run", |p| phase(p) == "Running").await;

    // Same volumes: a file written by one exec is read by the next.
    let (code, _, err) = kubectl_exec(&ns.name, &["toolbox", "--", "write", "/data/note", "written", "by", "exec"], None);
    assert_eq!(code, 0, "{err}\n{}", agent.log_tail());
    let (code, out, err) = kubectl_exec(&ns.name, &["toolbox", "--", "cat", "/data/note"], None);
    assert_eq!((code, out.trim()), (0, "written by exec"), "{err}");
    // Same env.
    let (code, out, _) = kubectl_exec(&ns.name, &["toolbox", "--", "env"], None);
    assert!(code == 0 && out.contains("GREETING=hi"), "{out}");
    // stdin reaches the instance.
    let (code, out, err) = kubectl_exec(&ns.name, &["-i", "toolbox", "--", "cat"], Some("piped through\n"));
    assert_eq!((code, out.as_str()), (0, "piped through\n"), "{err}");
    // A non-zero exit code comes back to kubectl.
    let (code, _, err) = kubectl_exec(&ns.name, &["toolbox", "--", "test", "-e", "/nonexistent"], None);
    assert_eq!(code, 1, "{err}");
    // Nothing outside the pod's grants: the host's root is not there.
    let (code, _, _) = kubectl_exec(&ns.name, &["toolbox", "--", "test", "-e", "/etc/passwd"], None);
    assert_eq!(code, 1, "the host filesystem is not visible");
}

#[tokio::test]
async fn kubectl_port_forward_reaches_the_pod_ip() {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let agent = &node().await;
    let ns = Ns::new("portfwd").await;
    ns.pod(agent, "tick", "ticker", "Always").await;
    ns.wait_pod(agent, "tick", "the ticker to run", |p| phase(p) == "Running").await;
    // Something listening on the pod IP (the node IP): an echo server standing in for a guest
    // that serves a port (wasi-http and sockets arrive later).
    let listener = tokio::net::TcpListener::bind((agent.node_ip.as_str(), 0)).await.unwrap();
    let port = listener.local_addr().unwrap().port();
    tokio::spawn(async move {
        while let Ok((mut s, _)) = listener.accept().await {
            tokio::spawn(async move {
                let mut buf = [0u8; 1024];
                while let Ok(n) = s.read(&mut buf).await {
                    if n == 0 || s.write_all(&buf[..n]).await.is_err() {
                        break;
                    }
                }
            });
        }
    });
    let mut child = Cluster::get()
        .kubectl()
        .args(["port-forward", "-n", &ns.name, "pod/tick", &format!(":{port}"), "--address", "127.0.0.1"])
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    // "Forwarding from 127.0.0.1:LOCAL -> PORT"
    let mut lines = BufReader::new(child.stdout.take().unwrap()).lines();
    let local: u16 = lines
        .find_map(|l| l.ok()?.strip_prefix("Forwarding from 127.0.0.1:")?.split_whitespace().next()?.parse().ok())
        .expect("kubectl prints the local port");
    let mut conn = tokio::net::TcpStream::connect(("127.0.0.1", local)).await.unwrap();
    conn.write_all(b"hello through the tunnel").await.unwrap();
    let mut got = vec![0u8; 24];
    let read = tokio::time::timeout(TEST_TIMEOUT, conn.read_exact(&mut got)).await;
    let _ = child.kill();
    let _ = child.wait();
    read.expect("an answer through the tunnel").unwrap();
    assert_eq!(&got, b"hello through the tunnel");
}

#[tokio::test]
async fn stats_summary_and_resource_metrics_from_real_measurements() {
    let agent = &test_node("stats", &["--housekeeping-interval=1s"]).await;
    let ns = Ns::new("stats").await;
    ns.pod(agent, "spin", "busy-loop", "Always").await;
    ns.wait_pod(agent, "spin", "the busy loop to run", |p| phase(p) == "Running").await;

    // Straight to the kubelet API with the admin's client certificate: the API server's node
    // proxy (`kubectl get --raw .../proxy/...`) refuses loopback node addresses, which is all
    // these tests may use. metrics-server scrapes the kubelet directly too.
    let pki = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
    let (crt, key) = (pki.join("admin.crt"), pki.join("admin.key"));
    let raw = |path: String| {
        let (code, body) = curl(agent, &path, Some((&crt, &key)));
        (code == 200).then_some(body)
    };
    // The busy loop's measured CPU rate: most of a core (the machine is shared with the
    // control plane, so "close to one core" is asserted as more than half of one).
    let summary_path = "/stats/summary".to_string();
    let cores = wait_for("a CPU rate for the busy loop in /stats/summary", TEST_TIMEOUT, || async {
        let doc: serde_json::Value = serde_json::from_str(&raw(summary_path.clone())?).ok()?;
        let pod = doc["pods"].as_array()?.iter().find(|p| p["podRef"]["name"] == "spin")?.clone();
        let nano = pod["containers"][0]["cpu"]["usageNanoCores"].as_u64()?;
        assert!(pod["containers"][0]["memory"]["workingSetBytes"].as_u64()? > 0);
        assert!(doc["node"]["cpu"]["usageCoreNanoSeconds"].as_u64()? > 0);
        (nano > 0).then_some(nano as f64 / 1e9)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert!(cores > 0.5, "a busy loop uses most of a core, measured {cores:.2}");

    let metrics = raw("/metrics/resource".to_string()).expect("/metrics/resource");
    let line = metrics.lines().find(|l| l.starts_with("container_cpu_usage_seconds_total{container=\"spin\",pod=\"spin\"")).unwrap_or_else(|| panic!("{metrics}"));
    let seconds: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(seconds > 0.0, "{line}");
    assert!(metrics.contains("node_memory_working_set_bytes "));
}

#[tokio::test]
async fn kubectl_top_shows_measured_figures_through_metrics_server() {
    let agent = &test_node("top", &["--housekeeping-interval=1s"]).await;
    let ns = Ns::new("top").await;
    ns.pod(agent, "spin", "busy-loop", "Always").await;
    ns.wait_pod(agent, "spin", "the busy loop to run", |p| phase(p) == "Running").await;
    let top = |args: &[&str]| {
        let out = Cluster::get().kubectl().arg("top").args(args).arg("--no-headers").output().unwrap();
        out.status.success().then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // metrics-server scrapes every 15 s and needs two scrapes for a rate.
    let line = wait_for("kubectl top pod to show the busy loop", Duration::from_secs(150), || async { top(&["pod", "-n", &ns.name, "spin"]) })
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    // "spin   950m   0Mi"
    let millicores: u64 = line.split_whitespace().nth(1).and_then(|c| c.strip_suffix('m')?.parse().ok()).unwrap_or_else(|| panic!("{line}"));
    assert!(millicores > 500, "a busy loop uses most of a core: {line}");
    let node_line = wait_for("kubectl top node", Duration::from_secs(60), || async { top(&["node", &agent.name]) }).await.unwrap();
    assert!(node_line.starts_with(&agent.name), "{node_line}");
}
