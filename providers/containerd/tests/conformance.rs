//! The provider conformance suite (provider-api's `conformance` feature) against a real
//! containerd and runc, with busybox images deploy/build-images pushes to the local cluster's
//! registry.
//!
//! containerd: the cluster's (`LC_CONTAINERD_SOCKET`, from the environment or the cluster's env
//! file) in a namespace of this test's own, or, when there is none, one this test starts under
//! a temporary directory and stops by PID. Needs root (containerd and runc do).

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use provider_api::conformance::{self, Case, Fixture};
use provider_api::Provider;
use provider_containerd::{ContainerdProvider, ProviderOptions};

/// A value of the local cluster's env file (`export NAME=value`), or of the environment.
fn cluster_var(name: &str) -> Option<String> {
    if let Ok(v) = std::env::var(name) {
        return Some(v);
    }
    let dir = std::env::var("LOCAL_CLUSTER_DIR").ok()?;
    let text = std::fs::read_to_string(Path::new(&dir).join("env")).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds and pushes the busybox image; returns `REGISTRY/busybox:1`.
fn busybox_image(registry: &str) -> String {
    let out = Command::new(workspace_root().join("deploy/build-images"))
        .arg(registry)
        .stderr(Stdio::inherit())
        .output()
        .expect("deploy/build-images runs");
    assert!(out.status.success(), "deploy/build-images failed");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.starts_with("busybox "),
        "build-images printed {text:?}"
    );
    format!("{registry}/busybox:1")
}

/// A containerd this test started, stopped (by PID) when dropped.
struct OwnContainerd {
    child: Child,
    dir: PathBuf,
}

impl Drop for OwnContainerd {
    fn drop(&mut self) {
        // SAFETY: kill(2) on the PID of our own child, which has not been reaped yet.
        unsafe { libc::kill(self.child.id() as i32, libc::SIGTERM) };
        let _ = self.child.wait();
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}

fn start_containerd() -> (PathBuf, Option<OwnContainerd>) {
    if let Some(socket) = cluster_var("LC_CONTAINERD_SOCKET") {
        if Path::new(&socket).exists() {
            return (PathBuf::from(socket), None);
        }
    }
    static NEXT: std::sync::atomic::AtomicU32 = std::sync::atomic::AtomicU32::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    // Short: a unix socket path has at most 107 bytes.
    let dir = PathBuf::from(format!("/tmp/ctd-t-{}-{n}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).unwrap();
    let socket = dir.join("c.sock");
    let config = format!(
        r#"version = 2
root = "{d}/root"
state = "{d}/state"
disabled_plugins = ["io.containerd.grpc.v1.cri"]
[grpc]
  address = "{s}"
[ttrpc]
  address = "{s}.ttrpc"
[debug]
  address = ""
[metrics]
  address = ""
[plugins."io.containerd.internal.v1.opt"]
  path = "{d}/opt"
"#,
        d = dir.display(),
        s = socket.display()
    );
    std::fs::write(dir.join("config.toml"), config).unwrap();
    let log = std::fs::File::create(dir.join("containerd.log")).unwrap();
    let child = Command::new("containerd")
        .arg("--config")
        .arg(dir.join("config.toml"))
        .stdout(Stdio::null())
        .stderr(log)
        .spawn()
        .expect("containerd is installed (deploy/setup-host)");
    (socket, Some(OwnContainerd { child, dir }))
}

struct Setup {
    options: ProviderOptions,
    fixture: Fixture,
    // Dropped last: stops containerd.
    _containerd: Option<OwnContainerd>,
    _work: TempDir,
}

/// A failed check leaves its containers behind: kill and delete everything in the test's
/// namespace (their shims end with them) before containerd stops, and remove the emptied runc
/// state and cgroup directories.
impl Drop for Setup {
    fn drop(&mut self) {
        let ctr = |args: &[&str]| {
            Command::new("ctr")
                .arg("--address")
                .arg(&self.options.socket)
                .arg("-n")
                .arg(&self.options.namespace)
                .args(args)
                .stderr(Stdio::null())
                .output()
                .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
                .unwrap_or_default()
        };
        for id in ctr(&["tasks", "list", "-q"]).lines() {
            ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            ctr(&["tasks", "delete", "-f", id]);
        }
        for id in ctr(&["containers", "list", "-q"]).lines() {
            ctr(&["containers", "delete", id]);
        }
        let _ =
            std::fs::remove_dir(Path::new("/run/containerd/runc").join(&self.options.namespace));
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for controller in controllers.flatten() {
                let _ = std::fs::remove_dir(
                    controller
                        .path()
                        .join(self.options.cgroup_parent.trim_start_matches('/')),
                );
            }
        }
    }
}

struct TempDir(PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

async fn connect(options: &ProviderOptions) -> ContainerdProvider {
    // containerd answers within a second of starting; a minute means it will not.
    let deadline = tokio::time::Instant::now() + conformance::WAIT;
    loop {
        match ContainerdProvider::connect(options.clone()).await {
            Ok(p) => return p,
            Err(e) if tokio::time::Instant::now() > deadline => {
                panic!(
                    "containerd at {} does not answer: {e}",
                    options.socket.display()
                )
            }
            Err(_) => tokio::time::sleep(Duration::from_millis(100)).await,
        }
    }
}

fn setup(test: &str) -> Setup {
    let registry = cluster_var("REGISTRY").expect(
        "the local cluster's registry: set LOCAL_CLUSTER_DIR (its env file names REGISTRY) or REGISTRY",
    );
    let image = busybox_image(&registry);
    let (socket, containerd) = start_containerd();
    let work = std::env::temp_dir().join(format!("ctd-conf-{test}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&work);
    std::fs::create_dir_all(&work).unwrap();
    let namespace = format!("conformance-{test}-{}", std::process::id());
    let mut options = ProviderOptions::new(socket, work.join("state"));
    options.cgroup_parent = format!("/wasm-kubelet/{namespace}");
    options.namespace = namespace;
    options.registries.insecure_registries = vec![registry];
    let sh = |script: &str, args: &[&str]| Case {
        image: image.clone(),
        command: ["sh", "-c", script]
            .iter()
            .chain(args)
            .map(|s| s.to_string())
            .collect(),
        args: vec![],
    };
    let prints = {
        let image = image.clone();
        move |code: i32| {
            let line = format!("conformance says {code}");
            let case = Case {
                image: image.clone(),
                command: vec![
                    "sh".into(),
                    "-c".into(),
                    r#"echo "$0"; exit "$1""#.into(),
                    line.clone(),
                    code.to_string(),
                ],
                args: vec![],
            };
            (case, line)
        }
    };
    let fixture = Fixture {
        prints_and_exits: Box::new(prints),
        ends_when_asked: Some(sh("trap 'exit 42' TERM; while true; do sleep 1; done", &[])),
        term_exit_code: 42,
        // PID 1 of its namespace with no handler: the kernel drops SIGTERM for it.
        ignores_stop: Case {
            image: image.clone(),
            command: vec!["sleep".into(), "100000".into()],
            args: vec![],
        },
        // Doubles a shell string until the limit ends it.
        memory_hog: sh(r#"a=x; while true; do a="$a$a"; done"#, &[]),
        memory_limit: 32 << 20,
        auth: vec![],
        work_dir: work.clone(),
        name: "containerd".into(),
    };
    Setup {
        options,
        fixture,
        _containerd: containerd,
        _work: TempDir(work),
    }
}

#[tokio::test]
async fn pull() {
    let s = setup("pull");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
}

#[tokio::test]
async fn exit_codes_and_logs() {
    let s = setup("exit");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_exit_codes_and_logs(&p, &s.fixture).await;
}

#[tokio::test]
async fn stop_with_grace() {
    let s = setup("stop");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_stop_with_grace(&p, &s.fixture).await;
}

#[tokio::test]
async fn memory_limit() {
    let s = setup("oom");
    let p = connect(&s.options).await;
    conformance::check_pull(&p, &s.fixture).await;
    conformance::check_memory_limit(&p, &s.fixture).await;
}

#[tokio::test]
async fn list_after_restart() {
    let s = setup("restart");
    let first = connect(&s.options).await;
    conformance::check_pull(&first, &s.fixture).await;
    let reopen = || async { Box::new(connect(&s.options).await) as Box<dyn Provider> };
    conformance::check_list_after_restart(&first, reopen, &s.fixture).await;
}
