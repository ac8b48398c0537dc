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

use integration_tests::{
    admin_cert, admin_tls, example_image, phase, push_examples, test_node, wait_for, Agent,
    Cluster, CpuOffer, TestNamespace, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::Pod;
use kube::api::PostParams;
use kube::Api;

/// The tests that measure a busy loop run one at a time: two busy loops on a 2-core machine
/// would each measure about half a core.
static CPU_HEAVY: tokio::sync::Mutex<()> = tokio::sync::Mutex::const_new(());

async fn node() -> Agent {
    test_node("server", &[]).await
}

type Ns = TestNamespace;

/// Single-container pods and `kubectl logs` in the test's namespace.
trait PodsAndLogs {
    async fn pod(&self, agent: &Agent, name: &str, example: &str, restart: &str);
    fn logs(&self, args: &[&str]) -> (bool, String, String);
    async fn wait_logs(
        &self,
        agent: &Agent,
        args: &[&str],
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> String;
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
        Api::<Pod>::namespaced(self.client.clone(), &self.name)
            .create(&PostParams::default(), &pod)
            .await
            .unwrap();
    }

    /// `kubectl logs -n <ns> <args>`: (success, stdout, stderr).
    fn logs(&self, args: &[&str]) -> (bool, String, String) {
        let out = Cluster::get()
            .kubectl()
            .args(["logs", "-n", &self.name])
            .args(args)
            .output()
            .expect("kubectl runs");
        (
            out.status.success(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
            String::from_utf8_lossy(&out.stderr).into_owned(),
        )
    }

    /// Waits until `kubectl logs <args>` succeeds with output that passes `check`.
    async fn wait_logs(
        &self,
        agent: &Agent,
        args: &[&str],
        what: &str,
        check: impl Fn(&str) -> bool,
    ) -> String {
        let result = wait_for(what, TEST_TIMEOUT, || async {
            let (ok, out, _) = self.logs(args);
            (ok && check(&out)).then_some(out)
        })
        .await;
        result.unwrap_or_else(|e| {
            panic!(
                "{e}\nlast try: {:?}\nagent log:\n{}",
                self.logs(args),
                agent.log_tail()
            )
        })
    }
}

fn restart_count(pod: &Pod) -> i32 {
    pod.status
        .as_ref()
        .and_then(|s| s.container_statuses.as_ref())
        .and_then(|c| c.first())
        .map_or(0, |c| c.restart_count)
}

fn tick_numbers(text: &str) -> Vec<u64> {
    text.lines()
        .filter_map(|l| l.trim().strip_prefix("tick ")?.parse().ok())
        .collect()
}

#[tokio::test]
async fn kubectl_logs_of_a_finished_pod_with_options() {
    let agent = &node().await;
    let ns = Ns::new("logs-hello").await;
    ns.pod(agent, "hello", "hello", "Never").await;
    ns.wait_pod(agent, "hello", "hello to succeed", |p| {
        phase(p) == "Succeeded"
    })
    .await;

    let plain = ns
        .wait_logs(
            agent,
            &["hello"],
            "kubectl logs to show hello's line",
            |o| o.contains("Hello from WebAssembly!"),
        )
        .await;

    let (ok, stamped, err) = ns.logs(&["hello", "--timestamps"]);
    assert!(ok, "{err}");
    let line = stamped
        .lines()
        .find(|l| l.contains("Hello from WebAssembly!"))
        .unwrap_or_else(|| panic!("{stamped}"));
    let (stamp, text) = line.split_once(' ').unwrap();
    assert!(
        stamp.parse::<jiff::Timestamp>().is_ok(),
        "an RFC 3339 timestamp first: {line:?}"
    );
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
    assert!(
        !ok && err.contains("nope"),
        "an unknown container is named in the error: {err}"
    );
    let (ok, _, err) = ns.logs(&["hello", "--previous"]);
    assert!(
        !ok && err.contains("previous terminated container"),
        "no previous run: {err}"
    );
    // The kubelet's plain-text error, not a Status object printed as JSON text.
    assert!(!err.contains("\"kind\""), "{err}");
}

#[tokio::test]
async fn kubectl_logs_tail_and_follow_on_a_ticker() {
    let agent = &node().await;
    let ns = Ns::new("logs-ticker").await;
    ns.pod(agent, "ticker", "ticker", "Always").await;
    ns.wait_logs(agent, &["ticker"], "a few ticks", |o| {
        tick_numbers(o).len() >= 4
    })
    .await;

    let (ok, tail, err) = ns.logs(&["ticker", "--tail=2"]);
    assert!(ok, "{err}");
    let ticks = tick_numbers(&tail);
    assert_eq!(tail.lines().count(), 2, "--tail=2: {tail:?}");
    assert!(
        ticks.len() == 2 && ticks[1] == ticks[0] + 1 && ticks[0] >= 3,
        "the last two ticks: {tail:?}"
    );

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
    let first = rx
        .recv_timeout(TEST_TIMEOUT)
        .expect("kubectl logs -f prints the last tick");
    let first = tick_numbers(&first)[0];
    let mut seen = vec![first];
    while seen.len() < 4 {
        match rx.recv_timeout(TEST_TIMEOUT) {
            Ok(line) => seen.extend(tick_numbers(&line)),
            Err(e) => {
                let _ = child.kill();
                panic!(
                    "kubectl logs -f stopped streaming ({e}) after {seen:?}\nagent log:\n{}",
                    agent.log_tail()
                );
            }
        }
    }
    let _ = child.kill();
    let _ = child.wait();
    assert_eq!(
        seen,
        (first..first + 4).collect::<Vec<_>>(),
        "new ticks arrive in order"
    );
}

#[tokio::test]
async fn kubectl_logs_previous_shows_the_run_before() {
    let agent = &node().await;
    let ns = Ns::new("logs-crash").await;
    ns.pod(agent, "crash", "crash-looper", "OnFailure").await;
    ns.wait_pod(agent, "crash", "a restart", |p| restart_count(p) >= 1)
        .await;
    let previous = ns
        .wait_logs(
            agent,
            &["crash", "--previous"],
            "the previous run's log",
            |o| o.contains("failing on purpose"),
        )
        .await;
    assert_eq!(
        previous.lines().count(),
        1,
        "one run's output: {previous:?}"
    );
}

/// `curl` to the agent's kubelet API: (HTTP status, body).
fn curl(agent: &Agent, path: &str, cert: Option<(&Path, &Path)>) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args(["-sk", "--max-time", "20", "-w", "\n%{http_code}"]);
    if let Some((crt, key)) = cert {
        cmd.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    let out = cmd
        .arg(format!("https://{}:10250{path}", agent.node_ip))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A client certificate for `cn`, signed by the cluster CA (so it authenticates, and has no
/// RBAC rights).
fn mint_client_cert(dir: &Path, cn: &str) -> (PathBuf, PathBuf) {
    let pki = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pki");
    let (key, csr, crt) = (
        dir.join(format!("{cn}.key")),
        dir.join(format!("{cn}.csr")),
        dir.join(format!("{cn}.crt")),
    );
    let run = |args: &[&str]| {
        let out = Command::new("openssl")
            .args(args)
            .output()
            .expect("openssl runs");
        assert!(
            out.status.success(),
            "openssl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    };
    let s = |p: &Path| p.display().to_string();
    // Extensions make it X.509 v3, which rustls requires (openssl signs v1 without them).
    let ext = dir.join(format!("{cn}.ext"));
    std::fs::write(
        &ext,
        "basicConstraints=CA:FALSE\nextendedKeyUsage=clientAuth\n",
    )
    .unwrap();
    run(&[
        "req",
        "-new",
        "-newkey",
        "rsa:2048",
        "-nodes",
        "-keyout",
        &s(&key),
        "-subj",
        &format!("/CN={cn}"),
        "-out",
        &s(&csr),
    ]);
    run(&[
        "x509",
        "-req",
        "-in",
        &s(&csr),
        "-CA",
        &s(&pki.join("ca.crt")),
        "-CAkey",
        &s(&pki.join("ca.key")),
        "-CAcreateserial",
        "-CAserial",
        &s(&dir.join("ca.srl")),
        "-days",
        "1",
        "-extfile",
        &s(&ext),
        "-out",
        &s(&crt),
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
    assert_eq!(
        (code, body.as_str()),
        (200, "ok"),
        "the admin may read /healthz"
    );

    let (code, body) = curl(agent, "/healthz", None);
    assert_eq!(code, 401, "no credentials: {body}");
    let status: serde_json::Value =
        serde_json::from_str(&body).unwrap_or_else(|e| panic!("{e}: {body}"));
    assert_eq!(
        (
            status["kind"].as_str(),
            status["reason"].as_str(),
            status["code"].as_u64()
        ),
        (Some("Status"), Some("Unauthorized"), Some(401))
    );

    let (crt, key) = mint_client_cert(&agent.dir, "nobody");
    let (code, body) = curl(agent, "/containerLogs/default/x/y", Some((&crt, &key)));
    assert_eq!(code, 403, "a user without rights: {body}");
    assert!(
        body.contains("user=nobody") && body.contains("subresource=proxy"),
        "{body}"
    );

    let (code, body) = curl(agent, "/containerLogs/default/no-such-pod/c", admin);
    assert_eq!(code, 404, "{body}");
    assert!(
        body.contains("no-such-pod") && !body.starts_with('{'),
        "a plain-text message, as the kubelet's: {body}"
    );
    let (code, body) = curl(
        agent,
        "/containerLogs/default/no-such-pod/c?tailLines=many",
        admin,
    );
    assert_eq!(code, 400, "a malformed query: {body}");
    let (code, _) = curl(
        agent,
        "/containerLogs/default/no-such-pod/c?follow=%ZZ",
        admin,
    );
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
        .stdin(if stdin.is_some() {
            Stdio::piped()
        } else {
            Stdio::null()
        })
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .expect("kubectl runs");
    if let (Some(text), Some(mut pipe)) = (stdin, child.stdin.take()) {
        pipe.write_all(text.as_bytes()).unwrap();
    }
    let out = child.wait_with_output().unwrap();
    (
        out.status.code().unwrap_or(-1),
        String::from_utf8_lossy(&out.stdout).into_owned(),
        String::from_utf8_lossy(&out.stderr).into_owned(),
    )
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
    Api::<Pod>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
    ns.wait_pod(agent, "toolbox", "the toolbox to run", |p| {
        phase(p) == "Running"
    })
    .await;

    // Same volumes: a file written by one exec is read by the next.
    let (code, _, err) = kubectl_exec(
        &ns.name,
        &[
            "toolbox",
            "--",
            "write",
            "/data/note",
            "written",
            "by",
            "exec",
        ],
        None,
    );
    assert_eq!(code, 0, "{err}\n{}", agent.log_tail());
    let (code, out, err) = kubectl_exec(&ns.name, &["toolbox", "--", "cat", "/data/note"], None);
    assert_eq!((code, out.trim()), (0, "written by exec"), "{err}");
    // Same env.
    let (code, out, _) = kubectl_exec(&ns.name, &["toolbox", "--", "env"], None);
    assert!(code == 0 && out.contains("GREETING=hi"), "{out}");
    // stdin reaches the instance.
    let (code, out, err) = kubectl_exec(
        &ns.name,
        &["-i", "toolbox", "--", "cat"],
        Some("piped through\n"),
    );
    assert_eq!((code, out.as_str()), (0, "piped through\n"), "{err}");
    // A non-zero exit code comes back to kubectl.
    let (code, _, err) = kubectl_exec(
        &ns.name,
        &["toolbox", "--", "test", "-e", "/nonexistent"],
        None,
    );
    assert_eq!(code, 1, "{err}");
    // Nothing outside the pod's grants: the host's root is not there.
    let (code, _, _) = kubectl_exec(
        &ns.name,
        &["toolbox", "--", "test", "-e", "/etc/passwd"],
        None,
    );
    assert_eq!(code, 1, "the host filesystem is not visible");
}

#[tokio::test]
async fn stats_summary_and_resource_metrics_from_real_measurements() {
    let _alone = CPU_HEAVY.lock().await;
    let agent = &test_node("stats", &["--housekeeping-interval=1s"]).await;
    let ns = Ns::new("stats").await;
    ns.pod(agent, "spin", "busy-loop", "Always").await;
    ns.wait_pod(agent, "spin", "the busy loop to run", |p| {
        phase(p) == "Running"
    })
    .await;

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
    let offer = CpuOffer::start();
    let cores = wait_for(
        "a CPU rate for the busy loop in /stats/summary",
        TEST_TIMEOUT,
        || async {
            let doc: serde_json::Value = serde_json::from_str(&raw(summary_path.clone())?).ok()?;
            let pod = doc["pods"]
                .as_array()?
                .iter()
                .find(|p| p["podRef"]["name"] == "spin")?
                .clone();
            let nano = pod["containers"][0]["cpu"]["usageNanoCores"].as_u64()?;
            assert!(pod["containers"][0]["memory"]["workingSetBytes"].as_u64()? > 0);
            assert!(doc["node"]["cpu"]["usageCoreNanoSeconds"].as_u64()? > 0);
            (nano > 0).then_some(nano as f64 / 1e9)
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let offered = offer.finish();
    // As much as the machine offers a busy thread (most of a core when it is idle; a fraction
    // when other builds load it), measured beside it.
    assert!(cores >= 0.5 * offered, "a busy loop uses what the machine offers: {cores:.2} cores, a native busy thread got {offered:.2}");

    let metrics = raw("/metrics/resource".to_string()).expect("/metrics/resource");
    let line = metrics
        .lines()
        .find(|l| {
            l.starts_with("container_cpu_usage_seconds_total{container=\"spin\",pod=\"spin\"")
        })
        .unwrap_or_else(|| panic!("{metrics}"));
    let seconds: f64 = line.split_whitespace().nth(1).unwrap().parse().unwrap();
    assert!(seconds > 0.0, "{line}");
    assert!(metrics.contains("node_memory_working_set_bytes "));
}

#[tokio::test]
async fn kubectl_top_shows_measured_figures_through_metrics_server() {
    let _alone = CPU_HEAVY.lock().await;
    let agent = &test_node("top", &["--housekeeping-interval=1s"]).await;
    let ns = Ns::new("top").await;
    ns.pod(agent, "spin", "busy-loop", "Always").await;
    ns.wait_pod(agent, "spin", "the busy loop to run", |p| {
        phase(p) == "Running"
    })
    .await;
    let top = |args: &[&str]| {
        let out = Cluster::get()
            .kubectl()
            .arg("top")
            .args(args)
            .arg("--no-headers")
            .output()
            .unwrap();
        out.status
            .success()
            .then(|| String::from_utf8_lossy(&out.stdout).into_owned())
    };
    // metrics-server scrapes every 15 s and needs two scrapes for a rate.
    let offer = CpuOffer::start();
    let line = wait_for(
        "kubectl top pod to show the busy loop",
        Duration::from_secs(150),
        || async { top(&["pod", "-n", &ns.name, "spin"]) },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    // "spin   950m   0Mi"
    let millicores: u64 = line
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.strip_suffix('m')?.parse().ok())
        .unwrap_or_else(|| panic!("{line}"));
    let offered = offer.finish();
    // Most of what the machine offered a busy thread over the same time (a core when idle).
    assert!(millicores as f64 >= 500.0 * offered, "a busy loop uses what the machine offers: {line} (a native busy thread got {offered:.2} cores)");
    let node_line = wait_for("kubectl top node", Duration::from_secs(60), || async {
        top(&["node", &agent.name])
    })
    .await
    .unwrap();
    assert!(node_line.starts_with(&agent.name), "{node_line}");
}

/// `curl -X <method>` to the agent's kubelet API: (HTTP status, body).
fn curl_method(
    agent: &Agent,
    method: &str,
    path: &str,
    cert: Option<(&Path, &Path)>,
) -> (u16, String) {
    let mut cmd = Command::new("curl");
    cmd.args([
        "-sk",
        "--max-time",
        "20",
        "-X",
        method,
        "-w",
        "\n%{http_code}",
    ]);
    if let Some((crt, key)) = cert {
        cmd.arg("--cert").arg(crt).arg("--key").arg(key);
    }
    let out = cmd
        .arg(format!("https://{}:10250{path}", agent.node_ip))
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", &text));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

/// A toolbox pod running `command` (with `stdin: true` when asked).
async fn toolbox_pod(ns: &Ns, agent: &Agent, name: &str, command: &[&str], stdin: bool) {
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": name},
        "spec": {
            "nodeName": agent.name, "restartPolicy": "Always", "terminationGracePeriodSeconds": 1,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": name, "image": example_image("toolbox"), "command": command, "stdin": stdin}],
        },
    }))
    .unwrap();
    Api::<Pod>::namespaced(ns.client.clone(), &ns.name)
        .create(&PostParams::default(), &pod)
        .await
        .unwrap();
}

/// Lines of a child's pipe, on a channel (so a test can wait for one with a time-out).
fn lines_of(pipe: impl std::io::Read + Send + 'static) -> mpsc::Receiver<String> {
    let (tx, rx) = mpsc::channel();
    std::thread::spawn(move || {
        for line in BufReader::new(pipe).lines().map_while(Result::ok) {
            if tx.send(line).is_err() {
                return;
            }
        }
    });
    rx
}

/// Waits for a line containing `what`; fails with what came instead.
fn expect_line(rx: &mpsc::Receiver<String>, what: &str, agent: &Agent) {
    let mut seen = Vec::new();
    loop {
        match rx.recv_timeout(TEST_TIMEOUT) {
            Ok(line) if line.contains(what) => return,
            Ok(line) => seen.push(line),
            Err(e) => panic!(
                "no line with {what:?} ({e}); got {seen:?}\nagent log:\n{}",
                agent.log_tail()
            ),
        }
    }
}

#[tokio::test]
async fn kubectl_attach_streams_live_output_and_forwards_stdin() {
    use std::io::Write;
    let agent = &node().await;
    let ns = Ns::new("attach").await;
    // `cat` with stdin: true echoes what an attached client sends.
    toolbox_pod(&ns, agent, "echo", &["cat"], true).await;
    ns.pod(agent, "tick", "ticker", "Always").await;
    ns.wait_pod(agent, "echo", "the echo pod to run", |p| {
        phase(p) == "Running"
    })
    .await;
    ns.wait_pod(agent, "tick", "the ticker to run", |p| {
        phase(p) == "Running"
    })
    .await;

    // stdin in, stdout out, through the real API server (WebSocket from kubectl, SPDY to us).
    let mut child = Cluster::get()
        .kubectl()
        .args(["attach", "-i", "-n", &ns.name, "echo", "-c", "echo"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"first line through attach\n").unwrap();
    stdin.flush().unwrap();
    expect_line(&out, "first line through attach", agent);
    stdin.write_all(b"and a second\n").unwrap();
    stdin.flush().unwrap();
    expect_line(&out, "and a second", agent);
    let _ = child.kill();
    let _ = child.wait();

    // Output only: the ticker's lines from now on.
    let mut child = Cluster::get()
        .kubectl()
        .args(["attach", "-n", &ns.name, "tick"])
        .stdout(Stdio::piped())
        .stderr(Stdio::null())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let first = out
        .recv_timeout(TEST_TIMEOUT)
        .unwrap_or_else(|e| panic!("kubectl attach printed nothing ({e})\n{}", agent.log_tail()));
    let second = out.recv_timeout(TEST_TIMEOUT).expect("a second tick");
    let _ = child.kill();
    let _ = child.wait();
    let (a, b) = (tick_numbers(&first), tick_numbers(&second));
    assert!(
        a.len() == 1 && b == [a[0] + 1],
        "consecutive live ticks: {first:?} {second:?}"
    );

    // stdin to a container without `stdin: true` is refused with a clear error.
    let out = Cluster::get()
        .kubectl()
        .args(["attach", "-i", "-n", &ns.name, "tick"])
        .stdin(Stdio::piped())
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("stdin is not enabled"),
        "{err}"
    );

    // `kubectl run -i` style: stdinOnce, so the end of the client's stdin is the end of the
    // container's, and `cat` finishes; kubectl attach ends with the container.
    let once: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "once"},
        "spec": {
            "nodeName": agent.name, "restartPolicy": "Never", "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "once", "image": example_image("toolbox"), "command": ["cat"], "stdin": true, "stdinOnce": true}],
        },
    }))
    .unwrap();
    ns.pods()
        .create(&PostParams::default(), &once)
        .await
        .unwrap();
    ns.wait_pod(agent, "once", "the stdinOnce pod to run", |p| {
        phase(p) == "Running"
    })
    .await;
    let mut child = Cluster::get()
        .kubectl()
        .args(["attach", "-i", "-n", &ns.name, "once"])
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = lines_of(child.stdout.take().unwrap());
    let mut stdin = child.stdin.take().unwrap();
    stdin.write_all(b"only once\n").unwrap();
    stdin.flush().unwrap();
    expect_line(&out, "only once", agent);
    drop(stdin);
    ns.wait_pod(agent, "once", "cat to end with its stdin", |p| {
        phase(p) == "Succeeded"
    })
    .await;
    let child = std::sync::Mutex::new(child);
    let status = wait_for(
        "kubectl attach to end with the container",
        TEST_TIMEOUT,
        || async { child.lock().unwrap().try_wait().ok().flatten() },
    )
    .await;
    let _ = child.lock().unwrap().kill();
    assert!(
        status.is_ok_and(|s| s.success()),
        "kubectl attach exits 0 when the container ends\n{}",
        agent.log_tail()
    );
}

#[tokio::test]
async fn pods_runningpods_configz_metrics_and_run_on_the_kubelet_api() {
    let agent = &node().await;
    let ns = Ns::new("podsapi").await;
    toolbox_pod(&ns, agent, "box", &["sleep", "3600"], false).await;
    let pod = ns
        .wait_pod(agent, "box", "the toolbox to run", |p| {
            phase(p) == "Running"
        })
        .await;
    let uid = pod.metadata.uid.clone().unwrap();
    let (crt, key) = admin_cert();
    let admin = Some((crt.as_path(), key.as_path()));
    let get_json = |path: &str| {
        let (code, body) = curl(agent, path, admin);
        assert_eq!(code, 200, "{path}: {body}");
        serde_json::from_str::<serde_json::Value>(&body)
            .unwrap_or_else(|e| panic!("{path}: {e}: {body}"))
    };

    // /pods: the desired pods with their current status.
    let found = wait_for("/pods to list the pod as Running", TEST_TIMEOUT, || async {
        let list = get_json("/pods");
        assert_eq!(list["kind"], "PodList");
        list["items"]
            .as_array()?
            .iter()
            .find(|p| p["metadata"]["uid"] == uid.as_str() && p["status"]["phase"] == "Running")
            .cloned()
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    assert_eq!(found["metadata"]["namespace"], ns.name.as_str());
    assert_eq!(
        found["spec"]["containers"][0]["image"],
        example_image("toolbox").as_str()
    );

    // /runningpods/: the runtime's view, minimal fields.
    let running = get_json("/runningpods/");
    let item = running["items"]
        .as_array()
        .unwrap()
        .iter()
        .find(|p| p["metadata"]["uid"] == uid.as_str())
        .unwrap_or_else(|| panic!("{running}"));
    assert_eq!(
        (
            item["metadata"]["name"].as_str(),
            item["metadata"]["namespace"].as_str()
        ),
        (Some("box"), Some(ns.name.as_str()))
    );
    assert_eq!(item["spec"]["containers"][0]["name"], "box");
    assert!(item.get("status").is_none(), "{item}");

    // /configz: the effective configuration.
    let configz = get_json("/configz");
    let kc = &configz["kubeletconfig"];
    assert_eq!(
        (kc["port"].as_u64(), kc["address"].as_str()),
        (Some(10250), Some(agent.node_ip.as_str())),
        "{configz}"
    );
    assert_eq!(kc["authentication"]["anonymous"]["enabled"], false);
    assert_eq!(kc["authorization"]["mode"], "Webhook");
    assert_eq!(kc["nodeStatusUpdateFrequency"], "10s");

    // /metrics: the pod start histogram counted this pod; the rest of the agent's series. The
    // series have different writers (the PLEG's relist every second, the pod worker, the HTTP
    // server once a response is out): wait until every one of them shows what is asserted,
    // rather than expect all in the scrape where the first one did.
    let value = |metrics: &str, name: &str| -> Option<f64> {
        metrics
            .lines()
            .find_map(|l| l.strip_prefix(name)?.strip_prefix(' ')?.parse().ok())
    };
    let node_series = format!("kubelet_node_name{{node=\"{}\"}}", agent.name);
    let at_least_one = [
        "kubelet_pod_start_duration_seconds_count",
        "kubelet_running_pods",
        "kubelet_running_containers{container_state=\"running\"}",
        "kubelet_pleg_relist_duration_seconds_count",
        "kubelet_pod_worker_duration_seconds_count{operation=\"create\"}",
        "kubelet_image_pull_duration_seconds_count{result=\"success\"}",
        "kubelet_http_requests_total{method=\"GET\",path=\"pods\",server_type=\"readwrite\",long_running=\"false\"}",
    ];
    let complete = |metrics: &str| {
        at_least_one
            .iter()
            .all(|name| value(metrics, name).is_some_and(|v| v >= 1.0))
            && value(metrics, &node_series) == Some(1.0)
            && value(metrics, "process_resident_memory_bytes").is_some_and(|v| v > 0.0)
            && metrics
                .lines()
                .any(|l| l.starts_with("rest_client_requests_total{code=\"200\",method=\"GET\""))
    };
    let scraped = wait_for(
        "/metrics to count the running pod in every series",
        TEST_TIMEOUT,
        || async {
            let (code, metrics) = curl(agent, "/metrics", admin);
            assert_eq!(code, 200, "{metrics}");
            complete(&metrics).then_some(())
        },
    )
    .await;
    if let Err(e) = scraped {
        let metrics = curl(agent, "/metrics", admin).1;
        let missing: Vec<&str> = at_least_one
            .iter()
            .copied()
            .filter(|name| !value(&metrics, name).is_some_and(|v| v >= 1.0))
            .collect();
        panic!(
            "{e}; below 1 or absent: {missing:?}; {node_series} = {:?}\n{metrics}",
            value(&metrics, &node_series)
        );
    }

    // /run: an exec answering with the combined output.
    let (code, body) = curl_method(
        agent,
        "POST",
        &format!("/run/{}/box/box?cmd=echo+ran+in+the+sandbox", ns.name),
        admin,
    );
    assert_eq!((code, body.as_str()), (200, "ran in the sandbox\n"));
    let (code, body) = curl_method(
        agent,
        "POST",
        &format!("/run/{}/box/box?cmd=test+-e+/nonexistent", ns.name),
        admin,
    );
    assert_eq!(code, 500, "a non-zero exit: {body}");
    let (code, _) = curl_method(
        agent,
        "POST",
        &format!("/run/{}/box/nope?cmd=echo", ns.name),
        admin,
    );
    assert_eq!(code, 404, "an unknown container");

    // The new endpoints are as locked down as the rest.
    let (crt, key) = mint_client_cert(&agent.dir, "nobody");
    for (path, subresource) in [
        ("/pods", "proxy"),
        ("/runningpods/", "proxy"),
        ("/configz", "proxy"),
        ("/metrics", "metrics"),
        ("/metrics/probes", "metrics"),
    ] {
        assert_eq!(curl(agent, path, None).0, 401, "{path} without credentials");
        let (code, body) = curl(agent, path, Some((&crt, &key)));
        assert_eq!(code, 403, "{path} for a user without rights: {body}");
        assert!(
            body.contains(&format!("subresource={subresource}")),
            "{body}"
        );
    }
    let (code, body) = curl_method(
        agent,
        "POST",
        &format!("/run/{}/box/box?cmd=echo", ns.name),
        Some((&crt, &key)),
    );
    assert!(code == 403 && body.contains("verb=create"), "{code} {body}");
}

#[tokio::test]
async fn standalone_node_serves_its_static_pods_with_anonymous_always_allow() {
    push_examples();
    let name = integration_tests::unique_name("standalone-api");
    let dir = integration_tests::workspace_root()
        .join("target/it")
        .join(&name);
    let manifests = dir.join("manifests");
    std::fs::create_dir_all(&manifests).unwrap();
    std::fs::write(
        manifests.join("tick.yaml"),
        format!("apiVersion: v1\nkind: Pod\nmetadata:\n  name: tick\n  namespace: default\nspec:\n  containers:\n  - name: tick\n    image: {}\n", example_image("ticker")),
    )
    .unwrap();
    // Reserved like every test agent's address, so no other test's agent shares it.
    let address = integration_tests::LoopbackAddress::reserve();
    let node_ip = address.ip.clone();
    let log = std::fs::File::create(dir.join("agent.log")).unwrap();
    let mut child = Command::new(integration_tests::agent_binary())
        .args([
            "--hostname-override",
            &name,
            "--node-ip",
            &node_ip,
            "--address",
            &node_ip,
            "--healthz-port=0",
            "-v=4",
        ])
        .arg("--root-dir")
        .arg(dir.join("root"))
        .arg("--pod-logs-dir")
        .arg(dir.join("logs"))
        .arg("--pod-manifest-path")
        .arg(&manifests)
        .args(["--anonymous-auth=true", "--authorization-mode=AlwaysAllow"])
        .args(integration_tests::local_node_flags())
        .stdout(log.try_clone().unwrap())
        .stderr(log)
        .spawn()
        .unwrap();
    let agent_log = || std::fs::read_to_string(dir.join("agent.log")).unwrap_or_default();
    let curl_anon = |path: &str| {
        let out = Command::new("curl")
            .args(["-sk", "--max-time", "20", "-w", "\n%{http_code}"])
            .arg(format!("https://{node_ip}:10250{path}"))
            .output()
            .unwrap();
        let text = String::from_utf8_lossy(&out.stdout).into_owned();
        let (body, code) = text
            .rsplit_once('\n')
            .map(|(b, c)| (b.to_string(), c.trim().parse::<u16>().unwrap_or(0)))
            .unwrap_or_default();
        (code, body)
    };
    let pods = wait_for(
        "/pods to show the static pod running",
        TEST_TIMEOUT,
        || async {
            let (code, body) = curl_anon("/pods");
            let list: serde_json::Value =
                serde_json::from_str(&body).ok().filter(|_| code == 200)?;
            let running = list["items"].as_array()?.iter().any(|p| {
                p["metadata"]["name"] == format!("tick-{name}").as_str()
                    && p["status"]["phase"] == "Running"
            });
            running.then_some(list)
        },
    )
    .await;
    let configz = curl_anon("/configz");
    let _ = child.kill();
    let _ = child.wait();
    let pods = pods.unwrap_or_else(|e| panic!("{e}\n{}", agent_log()));
    assert_eq!(pods["items"].as_array().unwrap().len(), 1, "{pods}");
    let pod = &pods["items"][0];
    assert_eq!(
        pod["metadata"]["annotations"]["kubernetes.io/config.source"], "file",
        "{pod}"
    );
    assert_eq!(configz.0, 200, "{}", configz.1);
    let kc: serde_json::Value = serde_json::from_str(&configz.1).unwrap();
    assert_eq!(
        kc["kubeletconfig"]["staticPodPath"],
        manifests.display().to_string().as_str()
    );
    assert_eq!(kc["kubeletconfig"]["authorization"]["mode"], "AlwaysAllow");
}

type Ws =
    tokio_tungstenite::WebSocketStream<tokio_rustls::client::TlsStream<tokio::net::TcpStream>>;

/// A WebSocket (`v5.channel.k8s.io`) straight to the kubelet API with the admin's certificate.
async fn websocket_connect(agent: &Agent, path_and_query: &str) -> Ws {
    websocket_connect_with(agent, path_and_query, "v5.channel.k8s.io").await
}

async fn websocket_connect_with(agent: &Agent, path_and_query: &str, protocol: &'static str) -> Ws {
    use tokio_tungstenite::tungstenite::client::IntoClientRequest;
    let stream = admin_tls(agent).await;
    let mut request = format!("wss://{}:10250{path_and_query}", agent.node_ip)
        .into_client_request()
        .unwrap();
    request
        .headers_mut()
        .insert("Sec-WebSocket-Protocol", protocol.parse().unwrap());
    let (ws, response) = tokio_tungstenite::client_async(request, stream)
        .await
        .unwrap_or_else(|e| panic!("WebSocket upgrade: {e}\n{}", agent.log_tail()));
    assert_eq!(response.headers()["sec-websocket-protocol"], protocol);
    ws
}

/// One exec over WebSocket: sends `stdin` (then v5's close signal for it), returns (stdout,
/// stderr, the error channel's Status).
async fn websocket_exec(
    agent: &Agent,
    path_and_query: &str,
    stdin: Option<&[u8]>,
) -> (String, String, serde_json::Value) {
    use futures::{SinkExt, StreamExt};
    use tokio_tungstenite::tungstenite::Message;
    let mut ws = websocket_connect(agent, path_and_query).await;
    if let Some(input) = stdin {
        let mut message = vec![0u8];
        message.extend_from_slice(input);
        ws.send(Message::Binary(message.into())).await.unwrap();
        ws.send(Message::Binary(vec![255u8, 0].into()))
            .await
            .unwrap();
    }
    let (mut stdout, mut stderr, mut status) = (Vec::new(), Vec::new(), Vec::new());
    let read = async {
        while let Some(Ok(message)) = ws.next().await {
            match message {
                Message::Binary(data) if !data.is_empty() => match data[0] {
                    1 => stdout.extend_from_slice(&data[1..]),
                    2 => stderr.extend_from_slice(&data[1..]),
                    3 => status.extend_from_slice(&data[1..]),
                    _ => {}
                },
                Message::Close(_) => break,
                _ => {}
            }
        }
    };
    tokio::time::timeout(TEST_TIMEOUT, read)
        .await
        .unwrap_or_else(|_| panic!("the WebSocket exec did not end\n{}", agent.log_tail()));
    let status = serde_json::from_slice(&status)
        .unwrap_or_else(|e| panic!("{e}: {:?}", String::from_utf8_lossy(&status)));
    (
        String::from_utf8_lossy(&stdout).into_owned(),
        String::from_utf8_lossy(&stderr).into_owned(),
        status,
    )
}

#[tokio::test]
async fn websocket_exec_and_attach_for_direct_clients() {
    let agent = &node().await;
    let ns = Ns::new("wsexec").await;
    toolbox_pod(&ns, agent, "box", &["sleep", "3600"], false).await;
    ns.wait_pod(agent, "box", "the toolbox to run", |p| {
        phase(p) == "Running"
    })
    .await;
    let base = format!("/exec/{}/box/box", ns.name);

    let (out, _, status) = websocket_exec(
        agent,
        &format!("{base}?command=echo&command=over&command=websocket&output=1&error=1"),
        None,
    )
    .await;
    assert_eq!(
        (out.as_str(), status["status"].as_str()),
        ("over websocket\n", Some("Success")),
        "{status}"
    );

    let (_, _, status) = websocket_exec(
        agent,
        &format!("{base}?command=test&command=-e&command=/nonexistent&output=1&error=1"),
        None,
    )
    .await;
    assert_eq!(
        (status["status"].as_str(), status["reason"].as_str()),
        (Some("Failure"), Some("NonZeroExitCode")),
        "{status}"
    );
    assert_eq!(
        status["details"]["causes"][0]["message"], "1",
        "the exit code: {status}"
    );

    // stdin, ended by v5's close signal.
    let (out, _, status) = websocket_exec(
        agent,
        &format!("{base}?command=cat&input=1&output=1&error=1"),
        Some(b"typed into the socket"),
    )
    .await;
    assert_eq!(
        (out.as_str(), status["status"].as_str()),
        ("typed into the socket", Some("Success")),
        "{status}"
    );

    // The base64 form: text messages, the channel as a digit, the data in base64.
    {
        use base64::Engine;
        use futures::StreamExt;
        let mut ws = websocket_connect_with(
            agent,
            &format!("{base}?command=echo&command=in&command=base64&output=1&error=1"),
            "v4.base64.channel.k8s.io",
        )
        .await;
        let (mut out, mut status) = (Vec::new(), Vec::new());
        let read = async {
            while let Some(Ok(message)) = ws.next().await {
                let tokio_tungstenite::tungstenite::Message::Text(text) = message else {
                    continue;
                };
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&text.as_str()[1..])
                    .unwrap();
                match text.as_str().as_bytes()[0] {
                    b'1' => out.extend(data),
                    b'3' => status.extend(data),
                    _ => {}
                }
            }
        };
        tokio::time::timeout(TEST_TIMEOUT, read)
            .await
            .expect("the base64 exec ends");
        let status: serde_json::Value = serde_json::from_slice(&status).unwrap();
        assert_eq!(
            (
                String::from_utf8_lossy(&out).as_ref(),
                status["status"].as_str()
            ),
            ("in base64\n", Some("Success")),
            "{status}"
        );
    }

    // Attach over WebSocket: the ticker's output from now on, on the stdout channel.
    use futures::StreamExt;
    ns.pod(agent, "tick", "ticker", "Always").await;
    ns.wait_pod(agent, "tick", "the ticker to run", |p| {
        phase(p) == "Running"
    })
    .await;
    // With a TTY: resize messages are read and ignored, the output goes on.
    let mut ws = websocket_connect(
        agent,
        &format!("/attach/{}/tick/tick?output=1&tty=1", ns.name),
    )
    .await;
    {
        use futures::SinkExt;
        let resize = [&[4u8][..], br#"{"Width":120,"Height":40}"#].concat();
        ws.send(tokio_tungstenite::tungstenite::Message::Binary(
            resize.into(),
        ))
        .await
        .unwrap();
    }
    let tick = tokio::time::timeout(TEST_TIMEOUT, async {
        while let Some(Ok(tokio_tungstenite::tungstenite::Message::Binary(data))) = ws.next().await
        {
            if data.first() == Some(&1) && data.len() > 1 {
                return String::from_utf8_lossy(&data[1..]).into_owned();
            }
        }
        String::new()
    })
    .await
    .unwrap_or_else(|_| panic!("no output on the attach\n{}", agent.log_tail()));
    assert!(tick.starts_with("tick "), "{tick:?}");
}
