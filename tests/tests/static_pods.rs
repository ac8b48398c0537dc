//! Static pods end to end: manifests in `--pod-manifest-path` run on the node and appear in
//! the real API server as mirror pods (annotation `kubernetes.io/config.mirror`, owned by the
//! Node, status written by the node); a deleted mirror comes back, an edited file restarts the
//! pod as a new one, a removed file removes the mirror, a malformed file leaves the others
//! running, an edited file's new pod starts only after the old one stopped, a broken manifest
//! URL keeps its last good pods. `--runonce` runs static pods without any API server and exits
//! with their verdict; without a kubeconfig the agent runs them standalone.

use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

use integration_tests::{
    agent_binary, example_image, push_examples, unique_name, wait_for, workspace_root, Agent,
    Cluster,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::api::DeleteParams;
use kube::Api;

const TIMEOUT: Duration = Duration::from_secs(90);
const MIRROR: &str = "kubernetes.io/config.mirror";

/// Writes a manifest the way an editor or config tool should: a hidden temporary file (which
/// the scan ignores) renamed into place, so a scan never sees half a file.
fn write_manifest(dir: &Path, file: &str, text: &str) {
    let tmp = dir.join(format!(".{file}.tmp"));
    std::fs::write(&tmp, text).unwrap();
    std::fs::rename(&tmp, dir.join(file)).unwrap();
}

fn ticker(name: &str, extra_env: Option<&str>) -> String {
    let env = extra_env
        .map(|v| format!("    env:\n    - {{name: VERSION, value: \"{v}\"}}\n"))
        .unwrap_or_default();
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata:\n  name: {name}\n  labels: {{app: {name}}}\nspec:\n  terminationGracePeriodSeconds: 2\n  containers:\n  - name: ticker\n    image: {}\n{env}",
        example_image("ticker")
    )
}

fn manifest_dir(agent_name: &str) -> PathBuf {
    let dir = workspace_root()
        .join("target/it")
        .join(agent_name)
        .join("manifests");
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    dir
}

fn annotation<'a>(pod: &'a Pod, key: &str) -> Option<&'a str> {
    pod.metadata
        .annotations
        .as_ref()?
        .get(key)
        .map(String::as_str)
}

fn phase(pod: &Pod) -> &str {
    pod.status
        .as_ref()
        .and_then(|s| s.phase.as_deref())
        .unwrap_or("")
}

fn running_ticker(pod: &Pod) -> bool {
    phase(pod) == "Running"
        && pod
            .status
            .as_ref()
            .and_then(|s| s.container_statuses.as_ref())
            .and_then(|c| c.first())
            .and_then(|c| c.state.as_ref()?.running.as_ref())
            .is_some()
}

/// Waits for the mirror pod `name` in namespace default to satisfy `check`.
async fn wait_mirror(
    pods: &Api<Pod>,
    agent: &Agent,
    name: &str,
    what: &str,
    check: impl Fn(&Pod) -> bool,
) -> Pod {
    match wait_for(what, TIMEOUT, || async {
        let pod = pods.get_opt(name).await.ok()??;
        check(&pod).then_some(pod)
    })
    .await
    {
        Ok(pod) => pod,
        Err(e) => {
            let pod = pods.get_opt(name).await.ok().flatten();
            panic!(
                "{e}\nmirror pod: {:#?}\nagent log:\n{}",
                pod,
                agent.log_tail()
            )
        }
    }
}

async fn start_node(what: &str, manifests: impl FnOnce(&Path)) -> (Agent, PathBuf) {
    push_examples();
    let name = unique_name(what);
    let dir = manifest_dir(&name);
    manifests(&dir);
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let agent = Agent::start(
        &name,
        &[
            "--pod-logs-dir",
            logs.to_str().unwrap(),
            "--pod-manifest-path",
            dir.to_str().unwrap(),
            "--file-check-frequency",
            "1s",
        ],
    )
    .unwrap();
    (agent, dir)
}

#[tokio::test]
async fn a_static_pod_runs_and_its_mirror_pod_follows_it() {
    let (agent, dir) = start_node("static", |dir| {
        write_manifest(dir, "ticker.yaml", &ticker("ticker", None))
    })
    .await;
    let client = Cluster::get().admin().await;
    let pods: Api<Pod> = Api::namespaced(client.clone(), "default");
    let mirror_name = format!("ticker-{}", agent.name);

    // The mirror pod appears, annotated, owned by the Node, with the running status.
    let mirror = wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the mirror pod to show the static pod running",
        |p| annotation(p, MIRROR).is_some() && running_ticker(p),
    )
    .await;
    let hash = annotation(&mirror, MIRROR).unwrap().to_string();
    assert_eq!(
        annotation(&mirror, "kubernetes.io/config.hash"),
        Some(hash.as_str())
    );
    assert_eq!(
        annotation(&mirror, "kubernetes.io/config.source"),
        Some("file")
    );
    assert!(annotation(&mirror, "kubernetes.io/config.seen").is_some());
    assert_ne!(
        mirror.metadata.uid.as_deref(),
        Some(hash.as_str()),
        "the mirror has its own UID"
    );
    let node = Api::<Node>::all(client.clone())
        .get(&agent.name)
        .await
        .unwrap();
    let owner = &mirror
        .metadata
        .owner_references
        .as_ref()
        .expect("owner references")[0];
    assert_eq!(
        (owner.kind.as_str(), owner.name.as_str()),
        ("Node", agent.name.as_str())
    );
    assert_eq!(Some(owner.uid.as_str()), node.metadata.uid.as_deref());
    let spec = mirror.spec.as_ref().unwrap();
    assert_eq!(spec.node_name.as_deref(), Some(agent.name.as_str()));
    assert!(
        spec.volumes.iter().flatten().all(|v| v.projected.is_none()),
        "no service-account token volume"
    );

    // Someone deletes the mirror pod: it comes back (same static pod, new mirror UID), running.
    let first_uid = mirror.metadata.uid.clone().unwrap();
    pods.delete(&mirror_name, &DeleteParams::default())
        .await
        .unwrap();
    let again = wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the deleted mirror pod to come back, running",
        |p| {
            p.metadata.uid.as_deref() != Some(first_uid.as_str())
                && p.metadata.deletion_timestamp.is_none()
                && running_ticker(p)
        },
    )
    .await;
    assert_eq!(
        annotation(&again, MIRROR),
        Some(hash.as_str()),
        "the same static pod"
    );

    // Editing the file makes a new pod (new hash) with the new spec.
    write_manifest(&dir, "ticker.yaml", &ticker("ticker", Some("2")));
    let edited = wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the edited static pod's mirror, running",
        |p| {
            annotation(p, MIRROR).is_some_and(|h| h != hash)
                && p.metadata.deletion_timestamp.is_none()
                && running_ticker(p)
        },
    )
    .await;
    let env = edited.spec.as_ref().unwrap().containers[0]
        .env
        .clone()
        .unwrap_or_default();
    assert!(
        env.iter()
            .any(|e| e.name == "VERSION" && e.value.as_deref() == Some("2")),
        "{env:?}"
    );
    // The old pod's containers were stopped: its log directory holds no running writer, and
    // the new one's log is in a directory named by the new UID.
    let new_hash = annotation(&edited, MIRROR).unwrap().to_string();
    let logs = agent.dir.join("logs");
    wait_for("the new pod's log directory", TIMEOUT, || async {
        std::fs::read_dir(&logs)
            .ok()?
            .filter_map(Result::ok)
            .any(|e| e.file_name().to_string_lossy().ends_with(&new_hash))
            .then_some(())
    })
    .await
    .unwrap();

    // Removing the file removes the mirror pod.
    std::fs::remove_file(dir.join("ticker.yaml")).unwrap();
    if let Err(e) = wait_for("the mirror pod to be deleted", TIMEOUT, || async {
        pods.get_opt(&mirror_name)
            .await
            .ok()?
            .is_none()
            .then_some(())
    })
    .await
    {
        panic!("{e}\nagent log:\n{}", agent.log_tail());
    }
}

#[tokio::test]
async fn a_malformed_manifest_leaves_the_good_pod_running() {
    let (agent, _dir) = start_node("static-bad", |dir| {
        write_manifest(dir, "good.yaml", &ticker("good", None));
        write_manifest(
            dir,
            "broken.yaml",
            "apiVersion: v1\nkind: Pod\nmetadata: {name: broken\nspec: [",
        );
        write_manifest(dir, "zz-dup.yaml", &ticker("good", Some("dup")));
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(Cluster::get().admin().await, "default");
    let good = wait_mirror(
        &pods,
        &agent,
        &format!("good-{}", agent.name),
        "the good static pod to run",
        running_ticker,
    )
    .await;
    assert!(
        good.spec.as_ref().unwrap().containers[0].env.is_none(),
        "the first file by name defines the pod; the duplicate is ignored"
    );
    assert!(pods
        .get_opt(&format!("broken-{}", agent.name))
        .await
        .unwrap()
        .is_none());
    let log = agent.log();
    assert!(
        log.lines()
            .any(|l| l.contains("WARN") && l.contains("broken.yaml") && l.contains("YAML")),
        "a warning names the broken file:\n{}",
        agent.log_tail()
    );
    assert!(
        log.lines().any(|l| l.contains("WARN")
            && l.contains("zz-dup.yaml")
            && l.contains("already defined")),
        "a warning names the duplicate:\n{}",
        agent.log_tail()
    );
    // ...and an Event on the Node says the same.
    let events: Api<k8s_openapi::api::core::v1::Event> =
        Api::namespaced(Cluster::get().admin().await, "default");
    let node_events = wait_for(
        "a FailedStaticPod event on the Node naming the broken file",
        TIMEOUT,
        || async {
            let list = events
                .list(&kube::api::ListParams::default().fields(&format!(
                    "involvedObject.name={},reason=FailedStaticPod",
                    agent.name
                )))
                .await
                .ok()?;
            list.items
                .iter()
                .any(|e| {
                    e.message
                        .as_deref()
                        .is_some_and(|m| m.contains("broken.yaml"))
                })
                .then_some(list.items.len())
        },
    )
    .await;
    assert!(node_events.is_ok(), "{node_events:?}\n{}", agent.log_tail());
}

/// Runs `wasm-kubelet --runonce` standalone (no kubeconfig) on `manifests`; returns (exit
/// code, stdout, stderr).
fn run_once(what: &str, manifests: &[(&str, String)]) -> (i32, String, String) {
    run_once_with(what, manifests, &[])
}

fn run_once_with(
    what: &str,
    manifests: &[(&str, String)],
    extra: &[&str],
) -> (i32, String, String) {
    push_examples();
    let name = unique_name(what);
    let base = workspace_root().join("target/it").join(&name);
    let dir = manifest_dir(&name);
    for (file, text) in manifests {
        write_manifest(&dir, file, text);
    }
    let mut child = Command::new(agent_binary())
        .args(integration_tests::local_node_flags())
        .args([
            "--runonce",
            "--enable-server=false",
            "--healthz-port=0",
            "-v=4",
            "--hostname-override",
            &name,
            "--pod-manifest-path",
        ])
        .arg(&dir)
        .arg("--root-dir")
        .arg(base.join("root"))
        .arg("--pod-logs-dir")
        .arg(base.join("logs"))
        .args(extra)
        .stdin(Stdio::null())
        // Files, not pipes: this loop does not read while it polls, and a -v=4 agent fills a
        // 64 KiB pipe and then blocks on its next log line.
        .stdout(std::fs::File::create(base.join("stdout")).unwrap())
        .stderr(std::fs::File::create(base.join("stderr")).unwrap())
        .spawn()
        .unwrap();
    let read = |file: &str| std::fs::read_to_string(base.join(file)).unwrap_or_default();
    let deadline = Instant::now() + TIMEOUT;
    let status = loop {
        if let Some(status) = child.try_wait().unwrap() {
            break status;
        }
        if Instant::now() > deadline {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "--runonce did not exit within {TIMEOUT:?}\n{}",
                read("stderr")
            );
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    (status.code().unwrap_or(-1), read("stdout"), read("stderr"))
}

fn job(name: &str, image: &str, args: &[&str]) -> String {
    format!(
        "apiVersion: v1\nkind: Pod\nmetadata: {{name: {name}}}\nspec:\n  containers:\n  - name: main\n    image: {}\n    args: {}\n",
        example_image(image),
        serde_json::to_string(args).unwrap()
    )
}

#[test]
fn runonce_standalone_exits_1_naming_the_failed_pod() {
    let (code, stdout, stderr) = run_once(
        "runonce-fail",
        &[
            ("hello.yaml", job("hello", "hello", &[])),
            ("exit3.yaml", job("exit3", "exit-with", &["3"])),
        ],
    );
    assert_eq!(code, 1, "stdout:\n{stdout}\nstderr:\n{stderr}");
    let lines: Vec<&str> = stdout.lines().collect();
    assert_eq!(
        lines.len(),
        2,
        "one line per pod:\n{stdout}\nstderr:\n{stderr}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("hello-") && l.ends_with(" Succeeded exit=0")),
        "{stdout}"
    );
    assert!(
        lines
            .iter()
            .any(|l| l.starts_with("exit3-") && l.ends_with(" Failed exit=3")),
        "{stdout}"
    );
    assert!(
        stderr.contains("1 of 2 static pods did not succeed"),
        "{stderr}"
    );
}

#[test]
fn runonce_standalone_exits_0_when_all_succeed() {
    let (code, stdout, stderr) =
        run_once("runonce-ok", &[("hello.yaml", job("hello", "hello", &[]))]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout.lines().count(), 1, "{stdout}");
    assert!(
        stdout.starts_with("hello-") && stdout.trim_end().ends_with(" Succeeded exit=0"),
        "{stdout}"
    );
}

#[test]
fn runonce_without_static_pods_says_so_and_exits_0() {
    let (code, stdout, stderr) = run_once("runonce-none", &[]);
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert_eq!(stdout.trim(), "no static pods to run");
}

/// Serves `body` on loopback to requests carrying `X-Test: yes` (403 otherwise); returns the URL.
fn serve_manifest(body: String) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/pods.yaml", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let request = String::from_utf8_lossy(&request).to_lowercase();
            let reply = if request.contains("x-test: yes") {
                format!(
                    "HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}",
                    body.len()
                )
            } else {
                "HTTP/1.1 403 Forbidden\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                    .to_string()
            };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    url
}

#[test]
fn runonce_runs_pods_from_a_manifest_url_with_its_header() {
    let list = format!(
        "apiVersion: v1\nkind: List\nitems:\n{}",
        job("from-url", "hello", &[])
            .lines()
            .map(|l| format!("  {l}\n"))
            .collect::<String>()
            .replacen("  apiVersion", "- apiVersion", 1)
    );
    let url = serve_manifest(list);
    let (code, stdout, stderr) = run_once_with(
        "runonce-url",
        &[],
        &[
            "--manifest-url",
            &url,
            "--manifest-url-header",
            "X-Test:yes",
        ],
    );
    assert_eq!(code, 0, "stdout:\n{stdout}\nstderr:\n{stderr}");
    assert!(
        stdout.starts_with("from-url-") && stdout.trim_end().ends_with(" Succeeded exit=0"),
        "{stdout}"
    );
}

/// The CRI timestamps (first field) of a log's lines.
fn log_times(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_default()
        .lines()
        .filter_map(|l| l.split(' ').next().map(str::to_string))
        .collect()
}

#[tokio::test]
async fn an_edited_static_pod_starts_only_after_the_old_version_stopped() {
    // The old version takes 3 s to stop (a preStop sleep) and ticks meanwhile: had the new
    // version started at once, as a new UID would, the two logs would overlap.
    let manifest = |version: &str| {
        format!(
            "apiVersion: v1\nkind: Pod\nmetadata:\n  name: slowstop\nspec:\n  terminationGracePeriodSeconds: 10\n  containers:\n  - name: ticker\n    image: {}\n    env:\n    - {{name: VERSION, value: \"{version}\"}}\n    lifecycle:\n      preStop:\n        sleep: {{seconds: 3}}\n",
            example_image("ticker")
        )
    };
    let (agent, dir) = start_node("static-order", |dir| {
        write_manifest(dir, "slowstop.yaml", &manifest("1"))
    })
    .await;
    let logs = agent.dir.join("logs");
    let prefix = format!("default_slowstop-{}_", agent.name);
    let log_dirs = || -> Vec<PathBuf> {
        std::fs::read_dir(&logs)
            .map(|d| {
                d.filter_map(Result::ok)
                    .map(|e| e.path())
                    .filter(|p| {
                        p.file_name()
                            .is_some_and(|n| n.to_string_lossy().starts_with(&prefix))
                    })
                    .collect()
            })
            .unwrap_or_default()
    };
    let old = wait_for("the first version to tick", TIMEOUT, || async {
        log_dirs()
            .into_iter()
            .find(|d| !log_times(&d.join("ticker/0.log")).is_empty())
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));

    write_manifest(&dir, "slowstop.yaml", &manifest("2"));
    // Five ticks of the new version: longer than the old one's preStop, so both logs are final
    // whichever order they ran in.
    let new = wait_for("the second version to tick five times", TIMEOUT, || async {
        log_dirs()
            .into_iter()
            .find(|d| *d != old && log_times(&d.join("ticker/0.log")).len() >= 5)
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\nagent log:\n{}", agent.log_tail()));
    // Compared as times: RFC 3339 text with trimmed fractions (".1Z", ".12Z") does not sort.
    let time = |s: &String| {
        s.parse::<jiff::Timestamp>()
            .unwrap_or_else(|e| panic!("a CRI timestamp {s:?}: {e}"))
    };
    let old_times = log_times(&old.join("ticker/0.log"));
    let new_times = log_times(&new.join("ticker/0.log"));
    let (old_last, new_first) = (old_times.last().unwrap(), new_times.first().unwrap());
    assert!(
        time(old_last) < time(new_first),
        "the new version ticked at {new_first}, before the old one's last tick at {old_last}"
    );
}

/// Serves whatever `body` holds at the time of each request on loopback (a 500 when it holds
/// nothing); returns the URL.
fn serve_switchable(body: std::sync::Arc<std::sync::Mutex<Option<String>>>) -> String {
    use std::io::{Read, Write};
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}/pods.yaml", listener.local_addr().unwrap());
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(mut stream) = stream else { continue };
            let mut request = Vec::new();
            let mut buf = [0u8; 1024];
            while !request.windows(4).any(|w| w == b"\r\n\r\n") {
                match stream.read(&mut buf) {
                    Ok(0) | Err(_) => break,
                    Ok(n) => request.extend_from_slice(&buf[..n]),
                }
            }
            let reply = match body.lock().unwrap().clone() {
                Some(body) => format!("HTTP/1.1 200 OK\r\nContent-Length: {}\r\nConnection: close\r\n\r\n{body}", body.len()),
                None => "HTTP/1.1 500 Internal Server Error\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".to_string(),
            };
            let _ = stream.write_all(reply.as_bytes());
        }
    });
    url
}

#[tokio::test]
async fn a_broken_or_unreachable_manifest_url_keeps_the_last_good_pods_running() {
    let body = std::sync::Arc::new(std::sync::Mutex::new(Some(ticker("from-url", None))));
    let url = serve_switchable(body.clone());
    push_examples();
    let name = unique_name("static-url");
    let logs = workspace_root().join("target/it").join(&name).join("logs");
    let agent = Agent::start(
        &name,
        &[
            "--pod-logs-dir",
            logs.to_str().unwrap(),
            "--manifest-url",
            &url,
            "--http-check-frequency",
            "1s",
        ],
    )
    .unwrap();
    let pods: Api<Pod> = Api::namespaced(Cluster::get().admin().await, "default");
    let mirror_name = format!("from-url-{}", agent.name);
    let first = wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the URL's static pod to run",
        |p| annotation(p, "kubernetes.io/config.source") == Some("http") && running_ticker(p),
    )
    .await;
    let hash = annotation(&first, MIRROR).unwrap().to_string();

    // Each broken state is seen by at least one fetch (its warning), a second later than the
    // one before: a dropped set would have removed the pod (and its mirror) by the next step.
    for (broken, what) in [
        (None, "HTTP status 500"),
        (Some("kind: [".to_string()), "not valid YAML"),
    ] {
        *body.lock().unwrap() = broken;
        wait_for(
            &format!("a warning that the manifest URL gives {what}"),
            TIMEOUT,
            || async {
                agent
                    .log()
                    .lines()
                    .any(|l| l.contains("WARN") && l.contains("manifest URL") && l.contains(what))
                    .then_some(())
            },
        )
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    }
    *body.lock().unwrap() = Some(ticker("from-url", None));
    let pod = wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the pod after the URL recovered",
        running_ticker,
    )
    .await;
    assert_eq!(
        pod.metadata.uid, first.metadata.uid,
        "the same mirror pod all along: the static pod was never removed"
    );
    assert_eq!(annotation(&pod, MIRROR), Some(hash.as_str()));
    assert!(
        !agent.log().contains("static pod gone"),
        "{}",
        agent.log_tail()
    );
    let restarts = pod
        .status
        .and_then(|s| s.container_statuses)
        .map(|c| c[0].restart_count);
    assert_eq!(restarts, Some(0));
}

#[test]
fn standalone_runs_a_static_pod_without_any_api_server() {
    push_examples();
    let name = unique_name("standalone");
    let base = workspace_root().join("target/it").join(&name);
    let dir = manifest_dir(&name);
    write_manifest(&dir, "ticker.yaml", &ticker("alone", None));
    let mut child = Command::new(agent_binary())
        .args(integration_tests::local_node_flags())
        .args([
            "--enable-server=false",
            "--healthz-port=0",
            "-v=4",
            "--hostname-override",
            &name,
            "--pod-manifest-path",
        ])
        .arg(&dir)
        .arg("--root-dir")
        .arg(base.join("root"))
        .arg("--pod-logs-dir")
        .arg(base.join("logs"))
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        // A file, not a pipe: nothing reads while the loop below polls, and a -v=4 agent fills
        // a 64 KiB pipe and then blocks on its next log line.
        .stderr(std::fs::File::create(base.join("agent.log")).unwrap())
        .spawn()
        .unwrap();
    // The pod's CRI log, under the kubelet's naming: default_alone-<node>_<uid>/ticker/0.log.
    let logs = base.join("logs");
    let prefix = format!("default_alone-{name}_");
    let deadline = Instant::now() + TIMEOUT;
    let ticked = loop {
        let found = std::fs::read_dir(&logs).ok().and_then(|d| {
            d.filter_map(Result::ok)
                .find(|e| e.file_name().to_string_lossy().starts_with(&prefix))
                .map(|e| std::fs::read_to_string(e.path().join("ticker/0.log")).unwrap_or_default())
        });
        if found.as_deref().is_some_and(|l| l.contains("tick 2")) {
            break true;
        }
        if Instant::now() > deadline || child.try_wait().unwrap().is_some() {
            break false;
        }
        std::thread::sleep(Duration::from_millis(200));
    };
    // SAFETY: plain kill(2) on our own child's PID.
    unsafe { libc::kill(child.id() as i32, libc::SIGTERM) };
    let status = child.wait().unwrap();
    integration_tests::unmount_under(&base);
    let log = std::fs::read_to_string(base.join("agent.log")).unwrap_or_default();
    assert!(
        ticked,
        "the static pod did not tick within {TIMEOUT:?}\n{log}"
    );
    assert!(
        status.success(),
        "a clean exit on SIGTERM: {status:?}\n{log}"
    );
}

#[tokio::test]
async fn an_agent_restart_adopts_a_running_static_pod_instead_of_starting_it_twice() {
    let (mut agent, _dir) = start_node("static-adopt", |dir| {
        write_manifest(dir, "ticker.yaml", &ticker("ticker", None))
    })
    .await;
    let pods: Api<Pod> = Api::namespaced(Cluster::get().admin().await, "default");
    let mirror_name = format!("ticker-{}", agent.name);
    wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the static ticker to run",
        running_ticker,
    )
    .await;

    // A static pod's manifest carries no status: what runs is known only from the runtime.
    agent.kill9();
    agent.spawn().unwrap();
    wait_for(
        "the restarted agent to adopt the static ticker",
        TIMEOUT,
        || async {
            let log = std::fs::read_to_string(agent.dir.join("agent.log")).ok()?;
            log.lines()
                .any(|l| {
                    l.contains("container adopted from the runtime")
                        && l.contains("container=ticker ")
                })
                .then_some(())
        },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", agent.log_tail()));
    let mirror = wait_mirror(
        &pods,
        &agent,
        &mirror_name,
        "the mirror to show the ticker running",
        running_ticker,
    )
    .await;
    let status = &mirror
        .status
        .as_ref()
        .unwrap()
        .container_statuses
        .as_ref()
        .unwrap()[0];
    assert_eq!(status.restart_count, 0, "{status:?}");
    // One instance: the runtime started the ticker once.
    let runtime_log =
        std::fs::read_to_string(agent.dir.join("root/runtime/wasm-runtime.log")).unwrap();
    let starts = runtime_log
        .lines()
        .filter(|l| l.contains("name=ticker") && l.ends_with("started"))
        .count();
    assert_eq!(
        starts, 1,
        "the runtime started the ticker once:\n{runtime_log}"
    );
}
