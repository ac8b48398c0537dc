//! What the containerd tests share: the local cluster's registry, a containerd (the cluster's
//! or one started by PID under a temporary directory), and the clean-up of a test's namespace.
#![allow(dead_code)]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::Duration;

use provider_api::conformance::{self, Case, Fixture};
use provider_containerd::{ContainerdProvider, ProviderOptions};

/// A value of the environment, or of the local cluster's env file (`export NAME=value`).
pub fn cluster_var(name: &str) -> Option<String> {
    if let Ok(v) = std::env::var(name) {
        return Some(v);
    }
    // The cluster's location as deploy/local-cluster and the integration harness have it:
    // $LOCAL_CLUSTER_DIR, else target/local-cluster of this checkout.
    let dir = std::env::var_os("LOCAL_CLUSTER_DIR")
        .map(PathBuf::from)
        .unwrap_or_else(|| workspace_root().join("target/local-cluster"));
    let text = std::fs::read_to_string(dir.join("env")).ok()?;
    text.lines()
        .filter_map(|l| l.strip_prefix("export "))
        .filter_map(|l| l.split_once('='))
        .find(|(k, _)| *k == name)
        .map(|(_, v)| v.to_string())
}

pub fn workspace_root() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("../..")
}

/// Builds and pushes the busybox image; returns `REGISTRY/busybox:1`.
pub fn busybox_image(registry: &str) -> String {
    busybox_image_with(registry, &[])
}

/// [`busybox_image`] with more `deploy/build-images` arguments (`--user`, `--cacert`).
pub fn busybox_image_with(registry: &str, extra: &[&str]) -> String {
    let out = Command::new(workspace_root().join("deploy/build-images"))
        .arg(registry)
        .args(extra)
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
pub struct OwnContainerd {
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

pub fn start_containerd() -> (PathBuf, Option<OwnContainerd>) {
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

pub struct Setup {
    pub options: ProviderOptions,
    pub fixture: Fixture,
    pub cleanup: Cleanup,
    // Dropped after the clean-up: stops containerd.
    pub containerd: Option<OwnContainerd>,
    pub work: TempDir,
}

/// A failed check leaves its containers behind: kill and delete everything in the test's
/// namespace (their shims end with them) and the namespace itself before containerd stops, and
/// remove the emptied runc state and cgroup directories.
pub struct Cleanup(pub ProviderOptions);

impl Drop for Cleanup {
    fn drop(&mut self) {
        let options = &self.0;
        let ctr = |args: &[&str]| ctr(options, args);
        for id in ctr(&["tasks", "list", "-q"]).lines() {
            ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            ctr(&["tasks", "delete", "-f", id]);
        }
        for id in ctr(&["containers", "list", "-q"]).lines() {
            ctr(&["containers", "delete", id]);
        }
        // The test's images and then its namespace (containerd refuses to remove a namespace
        // that still holds anything), so test runs do not pile up namespaces.
        for image in ctr(&["images", "list", "-q"]).lines() {
            ctr(&["images", "rm", "--sync", image]);
        }
        Command::new("ctr")
            .arg("--address")
            .arg(&options.socket)
            .args(["namespaces", "rm", &options.namespace])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .status()
            .ok();
        let _ = std::fs::remove_dir(Path::new("/run/containerd/runc").join(&options.namespace));
        if let Ok(controllers) = std::fs::read_dir("/sys/fs/cgroup") {
            for controller in controllers.flatten() {
                let _ = std::fs::remove_dir(
                    controller
                        .path()
                        .join(options.cgroup_parent.trim_start_matches('/')),
                );
            }
        }
    }
}

/// `ctr` in the test's namespace; its stdout ("" when it could not run).
pub fn ctr(options: &ProviderOptions, args: &[&str]) -> String {
    Command::new("ctr")
        .arg("--address")
        .arg(&options.socket)
        .arg("-n")
        .arg(&options.namespace)
        .args(args)
        .stderr(Stdio::null())
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
        .unwrap_or_default()
}

/// A fixture for tests that need one kind of container (`case` serves as the container that
/// ignores a stop and as the memory hog; nothing prints and exits or ends when asked).
pub fn one_case_fixture(case: Case, work_dir: &Path) -> Fixture {
    Fixture {
        prints_and_exits: Box::new(|_| unreachable!()),
        ends_when_asked: None,
        term_exit_code: 0,
        ignores_stop: case.clone(),
        memory_hog: case,
        memory_limit: 0,
        auth: vec![],
        work_dir: work_dir.to_path_buf(),
        name: "containerd".into(),
    }
}

pub struct TempDir(pub PathBuf);
impl Drop for TempDir {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub async fn connect(options: &ProviderOptions) -> ContainerdProvider {
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
