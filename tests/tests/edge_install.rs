//! The edge host install (deploy/systemd/install) into a temporary prefix, then the installed
//! agent and runtime run exactly as their units' ExecStart lines say (the flags read from the
//! installed defaults file, as systemd's EnvironmentFile gives them): the node joins the local
//! cluster with its bootstrap token, a Wasm pod runs on it, and `systemctl restart
//! wasm-kubelet` done by hand (SIGTERM to the agent, start it again) keeps the pod running with
//! the same container in the runtime unit's process.
//!
//! This machine has systemctl but systemd is not its PID 1: the install must say so, not fail.

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};

use integration_tests::{
    admin_cert, agent_binary, example_image, node_condition, phase, push_examples, runtime_cgroup,
    unique_name, unmount_under, wait_for, workspace_root, Cluster, LoopbackAddress, TestNamespace,
    TEST_EVICTION_HARD, TEST_TIMEOUT,
};
use k8s_openapi::api::core::v1::{Node, Pod};
use kube::Api;

/// The unit's command line as systemd runs it: `ExecStart=` split on whitespace, with
/// `$WASM_KUBELET_FLAGS` (unbraced: split into words by systemd) from the EnvironmentFile.
fn exec_start(unit: &Path, defaults: &Path) -> Vec<String> {
    let text = std::fs::read_to_string(unit).unwrap();
    let env_file = text
        .lines()
        .find_map(|l| l.strip_prefix("EnvironmentFile="))
        .unwrap_or_else(|| panic!("no EnvironmentFile in {}", unit.display()));
    assert_eq!(
        Path::new(env_file.trim_start_matches('-')),
        defaults,
        "{} reads the installed defaults file",
        unit.display()
    );
    let env = std::fs::read_to_string(defaults).unwrap();
    let flags = env
        .lines()
        .find_map(|l| l.strip_prefix("WASM_KUBELET_FLAGS="))
        .expect("WASM_KUBELET_FLAGS in the defaults file")
        .trim_matches('"')
        .to_string();
    let exec = text
        .lines()
        .find_map(|l| l.strip_prefix("ExecStart="))
        .unwrap_or_else(|| panic!("no ExecStart in {}", unit.display()));
    exec.split_whitespace()
        .flat_map(|word| match word {
            "$WASM_KUBELET_FLAGS" => flags.split_whitespace().map(String::from).collect(),
            w => vec![w.to_string()],
        })
        .collect()
}

/// A process started from a unit's command line; SIGKILLed when dropped if still running.
struct Unit {
    child: Child,
}

impl Unit {
    fn start(argv: &[String], log: &Path) -> Unit {
        let log = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(log)
            .unwrap();
        let child = Command::new(&argv[0])
            .args(&argv[1..])
            .stdin(Stdio::null())
            .stdout(log.try_clone().unwrap())
            .stderr(log)
            .spawn()
            .unwrap_or_else(|e| panic!("{}: {e}", argv[0]));
        Unit { child }
    }

    fn alive(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }
}

impl Drop for Unit {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// Cleans what the test's node leaves: its volumes' mounts, its runtime's cgroup, the Node.
struct Cleanup {
    name: String,
    dir: PathBuf,
    runtime_cgroup: Option<PathBuf>,
}

impl Drop for Cleanup {
    fn drop(&mut self) {
        unmount_under(&self.dir);
        if let Some(cgroup) = &self.runtime_cgroup {
            let _ = std::fs::remove_dir(cgroup);
        }
        let pids = Path::new(Cluster::get().var("LOCAL_CLUSTER_DIR")).join("pids");
        for f in ["pid", "cmd", "runtime"] {
            let _ = std::fs::remove_file(pids.join(format!("agent-{}.{f}", self.name)));
        }
        let _ = Cluster::get()
            .kubectl()
            .args([
                "delete",
                "node",
                &self.name,
                "--ignore-not-found",
                "--wait=false",
            ])
            .output();
    }
}

/// The token of the local cluster's bootstrap kubeconfig (ID.SECRET).
fn bootstrap_token() -> String {
    let path = Path::new(Cluster::get().var("BOOTSTRAP_KUBECONFIG"));
    let text = std::fs::read_to_string(path).unwrap();
    text.lines()
        .find_map(|l| l.trim().strip_prefix("token:"))
        .expect("a token in the bootstrap kubeconfig")
        .trim()
        .trim_matches('"')
        .to_string()
}

/// The pod's first container ID, as the agent serving `ip`'s kubelet API lists it on `/pods`.
fn kubelet_container_id(ip: &str, ns: &str, pod: &str) -> Option<String> {
    let (crt, key) = admin_cert();
    let out = Command::new("curl")
        .args(["-sk", "--max-time", "10", "--cert"])
        .arg(crt)
        .arg("--key")
        .arg(key)
        .arg(format!("https://{ip}:10250/pods"))
        .output()
        .ok()?;
    let list: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
    list["items"]
        .as_array()?
        .iter()
        .find(|p| p["metadata"]["namespace"] == ns && p["metadata"]["name"] == pod)?["status"]
        ["containerStatuses"][0]["containerID"]
        .as_str()
        .map(String::from)
}

#[tokio::test]
async fn installed_units_join_with_a_bootstrap_token_and_a_restart_keeps_the_pod() {
    push_examples();
    let cluster = Cluster::get();
    let name = unique_name("edge");
    let dir = workspace_root().join("target/it").join(&name);
    let _ = std::fs::remove_dir_all(&dir);
    let prefix = dir.join("prefix");
    let address = LoopbackAddress::reserve();
    let ip = address.ip.clone();
    let ca = Path::new(cluster.var("LOCAL_CLUSTER_DIR")).join("pki/ca.crt");
    let mut cleanup = Cleanup {
        name: name.clone(),
        dir: dir.clone(),
        runtime_cgroup: None,
    };

    // What a person on the edge host runs (the node IP and this machine's test settings as
    // extra flags; the API server's address from the cluster's env).
    let flags = format!(
        "--node-ip={ip} --address={ip} --healthz-port=0 --insecure-registries={} {TEST_EVICTION_HARD} -v=4",
        cluster.var("REGISTRY")
    );
    let install = Command::new(workspace_root().join("deploy/systemd/install"))
        .arg("--prefix")
        .arg(&prefix)
        .args(["--api-server", cluster.var("APISERVER")])
        .args(["--token", &bootstrap_token()])
        .arg("--ca-file")
        .arg(&ca)
        .arg("--binary")
        .arg(agent_binary())
        .args(["--node-name", &name, "--flags", &flags])
        .output()
        .unwrap();
    let said = String::from_utf8_lossy(&install.stderr).into_owned();
    assert!(install.status.success(), "install: {said}");
    if !Path::new("/run/systemd/system").exists() {
        assert!(said.contains("systemd is not PID 1"), "{said}");
    }

    // The installed tree.
    let bin = prefix.join("usr/local/bin/wasm-kubelet");
    let units = prefix.join("etc/systemd/system");
    let defaults = prefix.join("etc/default/wasm-kubelet");
    let etc = prefix.join("etc/wasm-kubelet");
    let version = Command::new(&bin).arg("--version").output().unwrap();
    assert!(version.status.success());
    assert!(String::from_utf8_lossy(&version.stdout).starts_with("wasm-kubelet "));
    let bootstrap = std::fs::read_to_string(etc.join("bootstrap-kubeconfig")).unwrap();
    assert!(bootstrap.contains(&format!("server: {}", cluster.var("APISERVER"))));
    use std::os::unix::fs::PermissionsExt;
    let mode = std::fs::metadata(etc.join("bootstrap-kubeconfig"))
        .unwrap()
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o077,
        0,
        "the token is readable by root only: {mode:o}"
    );
    assert!(
        !etc.join("kubeconfig").exists(),
        "no credentials yet but the token"
    );
    let runtime_argv = exec_start(&units.join("wasm-kubelet-runtime.service"), &defaults);
    let agent_argv = exec_start(&units.join("wasm-kubelet.service"), &defaults);
    assert_eq!(Path::new(&runtime_argv[0]), bin, "{runtime_argv:?}");
    assert_eq!(runtime_argv[1], "runtime");
    assert!(
        agent_argv.contains(&"--wasm-runtime=external".to_string()),
        "{agent_argv:?}"
    );
    assert!(
        agent_argv.contains(&format!("--config={}", etc.join("config.yaml").display())),
        "{agent_argv:?}"
    );

    // `systemctl start`: the runtime unit, then the agent's (After=/Wants= the runtime).
    let log = dir.join("units.log");
    let mut runtime = Unit::start(&runtime_argv, &log);
    let mut agent = Unit::start(&agent_argv, &log);
    let pids = Path::new(cluster.var("LOCAL_CLUSTER_DIR")).join("pids");
    let _ = std::fs::create_dir_all(&pids);
    let _ = std::fs::write(
        pids.join(format!("agent-{name}.pid")),
        agent.child.id().to_string(),
    );
    let _ = std::fs::write(
        pids.join(format!("agent-{name}.cmd")),
        bin.display().to_string(),
    );
    let _ = std::fs::write(
        pids.join(format!("agent-{name}.runtime")),
        runtime.child.id().to_string(),
    );
    let tail = || {
        let text = std::fs::read_to_string(&log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    };

    // Joined with the token: a client certificate by CSR, the kubeconfig written, Ready.
    let nodes: Api<Node> = Api::all(cluster.admin().await);
    wait_for("the installed node Ready", TEST_TIMEOUT, || async {
        nodes
            .get_opt(&name)
            .await
            .ok()?
            .filter(|n| node_condition(n, "Ready").as_deref() == Some("True"))
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tail()));
    assert!(
        etc.join("kubeconfig").exists(),
        "the kubeconfig the bootstrap wrote"
    );

    let ns = TestNamespace::new("edge").await;
    let pod: Pod = serde_json::from_value(serde_json::json!({
        "metadata": {"name": "ticker"},
        "spec": {
            "nodeName": name,
            "tolerations": [{"operator": "Exists"}],
            "containers": [{"name": "tick", "image": example_image("ticker")}],
        },
    }))
    .unwrap();
    ns.pods().create(&Default::default(), &pod).await.unwrap();
    let pods = ns.pods();
    let running = |what: &'static str| {
        let pods = pods.clone();
        async move {
            wait_for(what, TEST_TIMEOUT, || async {
                pods.get_opt("ticker")
                    .await
                    .ok()?
                    .filter(|p| phase(p) == "Running")
            })
            .await
        }
    };
    let before = running("the ticker running")
        .await
        .unwrap_or_else(|e| panic!("{e}\n{}", tail()));
    let status = |p: &Pod| {
        let c = &p
            .status
            .as_ref()
            .unwrap()
            .container_statuses
            .as_ref()
            .unwrap()[0];
        (c.container_id.clone().unwrap(), c.restart_count)
    };
    let (container, restarts) = status(&before);
    assert_eq!(restarts, 0);

    // `systemctl restart wasm-kubelet` by hand: SIGTERM (systemd's KillSignal), wait for the
    // agent to exit by itself, start the unit's command again.
    // SAFETY: kill(2) on our own child.
    unsafe { libc::kill(agent.child.id() as i32, libc::SIGTERM) };
    let exited = wait_for("the agent to exit on SIGTERM", TEST_TIMEOUT, || {
        let status = agent.child.try_wait().ok().flatten();
        async move { status }
    })
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tail()));
    assert!(
        exited.success(),
        "a clean exit on SIGTERM: {exited:?}\n{}",
        tail()
    );
    assert!(
        runtime.alive(),
        "the runtime unit keeps running: {}",
        tail()
    );
    drop(agent);
    let agent = Unit::start(&agent_argv, &log);
    let _ = std::fs::write(
        pids.join(format!("agent-{name}.pid")),
        agent.child.id().to_string(),
    );

    // The new agent serves the same container (listed on its own kubelet API), and the API
    // shows it running, never restarted.
    let listed = wait_for(
        "the restarted agent to list the pod",
        TEST_TIMEOUT,
        || async { kubelet_container_id(&ip, &ns.name, "ticker") },
    )
    .await
    .unwrap_or_else(|e| panic!("{e}\n{}", tail()));
    assert_eq!(listed, container, "the same container after the restart");
    let after = running("the ticker still running").await.unwrap();
    assert_eq!(status(&after), (container, 0), "{:#?}", after.status);
    assert!(runtime.alive(), "the runtime unit still runs: {}", tail());
    drop(agent);
    cleanup.runtime_cgroup = runtime_cgroup(runtime.child.id());
    drop(runtime);
    drop(address);
}
