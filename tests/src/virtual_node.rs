//! The virtual node of deploy/virtual-node as a test deploys it: the agent image built by
//! `build-image` ([`build_agent_image`]), a kustomize overlay of the manifests applied with the
//! real kubectl ([`Deployment`]), and the API server and registry made reachable from inside
//! the agent pod's network namespace ([`NetnsRelay`]).
//!
//! Network safety: the local cluster listens on 127.0.0.1 only, which a pod (in its own
//! network namespace) cannot reach; a cluster's pods reach its API server at an address of
//! its network. The relay stands in for that network: it listens on the *pod's* loopback
//! (127.0.0.1:<port> inside the namespace the mixed node made for the pod) and carries each
//! connection to the same port on the host's loopback. Every packet is on a loopback.

use std::os::fd::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};

use crate::{agent_binary, workspace_root, Cluster};

/// Builds the agent image from the debug agent binary with deploy/virtual-node/build-image and
/// pushes it to the local registry as `wasm-kubelet-it:<tag>`: `REFERENCE@DIGEST`, and the
/// compressed layer's size in bytes (from the script's stderr).
pub fn build_agent_image(tag: &str) -> (String, u64) {
    let cluster = Cluster::get();
    let target = format!("{}/wasm-kubelet-it:{tag}", cluster.var("REGISTRY"));
    let out = Command::new(workspace_root().join("deploy/virtual-node/build-image"))
        .arg("--binary")
        .arg(agent_binary())
        .args(["--push", &target])
        .output()
        .expect("build-image runs");
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert!(out.status.success(), "build-image: {stderr}");
    let reference = String::from_utf8_lossy(&out.stdout).trim().to_string();
    let size = stderr
        .split_whitespace()
        .skip_while(|w| *w != "layer")
        .nth(1)
        .and_then(|n| n.parse().ok())
        .unwrap_or(0);
    (reference, size)
}

/// deploy/virtual-node applied through an overlay of the test's own: its namespace, a name
/// suffix unique to the run (so the cluster-wide objects, RuntimeClass and bindings, are the
/// run's own), the image, and `patches` (kustomize JSON 6902 operations on the StatefulSet).
/// Its bootstrap token comes from make-bootstrap. Everything is deleted when dropped.
pub struct Deployment {
    pub dir: PathBuf,
    pub namespace: String,
    pub suffix: String,
    /// The bootstrap token's id (its Secret is kube-system/bootstrap-token-<id>).
    pub token_id: String,
    cluster: &'static Cluster,
}

impl Deployment {
    /// Writes the overlay under `dir`, applies make-bootstrap's output, then the overlay.
    pub fn apply(dir: &Path, suffix: &str, image: &str, patches: &serde_json::Value) -> Deployment {
        let cluster = Cluster::get();
        let namespace = format!("vn-{suffix}");
        std::fs::create_dir_all(dir).expect("overlay dir");
        let base = workspace_root().join("deploy/virtual-node");
        // kustomize takes a base by relative path.
        let up = dir
            .strip_prefix(workspace_root())
            .expect("the overlay is under the workspace")
            .components()
            .map(|_| "..")
            .collect::<Vec<_>>()
            .join("/");
        let (name, digest) = image.split_once('@').expect("REFERENCE@DIGEST");
        let name = name.rsplit_once(':').map_or(name, |(n, _)| n);
        let kustomization = serde_json::json!({
            "apiVersion": "kustomize.config.k8s.io/v1beta1",
            "kind": "Kustomization",
            "resources": [format!("{up}/deploy/virtual-node")],
            "namespace": namespace,
            "nameSuffix": format!("-{suffix}"),
            "images": [{"name": "wasm-kubelet", "newName": name, "digest": digest}],
            "patches": [{
                "target": {"kind": "StatefulSet"},
                "patch": patches.to_string(),
            }],
        });
        // JSON is YAML.
        std::fs::write(dir.join("kustomization.yaml"), kustomization.to_string()).unwrap();
        assert!(base.join("kustomization.yaml").exists());

        let bootstrap = Command::new(base.join("make-bootstrap"))
            .args(["--namespace", &namespace, "--ttl", "1h"])
            .env("KUBECTL", cluster.var("KUBECTL"))
            .env("KUBECONFIG", cluster.var("KUBECONFIG"))
            .output()
            .expect("make-bootstrap runs");
        let stderr = String::from_utf8_lossy(&bootstrap.stderr).into_owned();
        assert!(bootstrap.status.success(), "make-bootstrap: {stderr}");
        let token_id = stderr
            .split_whitespace()
            .skip_while(|w| *w != "id")
            .nth(1)
            .expect("make-bootstrap names the token id")
            .to_string();
        let deployment = Deployment {
            dir: dir.to_path_buf(),
            namespace,
            suffix: suffix.to_string(),
            token_id,
            cluster,
        };
        deployment.kubectl_stdin(&["apply", "-f", "-"], &bootstrap.stdout);
        deployment.kubectl(&["apply", "-k"], &[dir]);
        deployment
    }

    /// A name of the overlay (`wasm-kubelet` -> `wasm-kubelet-<suffix>`).
    pub fn name(&self, base: &str) -> String {
        format!("{base}-{}", self.suffix)
    }

    fn kubectl(&self, args: &[&str], paths: &[&Path]) -> String {
        let out = self
            .cluster
            .kubectl()
            .args(args)
            .args(paths)
            .output()
            .expect("kubectl runs");
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stdout).into_owned()
    }

    fn kubectl_stdin(&self, args: &[&str], input: &[u8]) {
        use std::io::Write;
        let mut child = self
            .cluster
            .kubectl()
            .args(args)
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .expect("kubectl runs");
        child.stdin.take().unwrap().write_all(input).unwrap();
        let out = child.wait_with_output().unwrap();
        assert!(
            out.status.success(),
            "kubectl {args:?}: {}",
            String::from_utf8_lossy(&out.stderr)
        );
    }
}

impl Drop for Deployment {
    fn drop(&mut self) {
        // The pods' API objects first: the node that runs them (the test's mixed node) goes
        // right after, and a pod left on a dead node would hold the namespace (and its claim,
        // and the claim's volume) in Terminating for good.
        let _ = self
            .cluster
            .kubectl()
            .args([
                "delete",
                "pods",
                "--all",
                "--grace-period=0",
                "--force",
                "-n",
            ])
            .arg(&self.namespace)
            .output();
        let _ = self
            .cluster
            .kubectl()
            .args(["delete", "--wait=false", "--ignore-not-found", "-k"])
            .arg(&self.dir)
            .output();
        let _ = self
            .cluster
            .kubectl()
            .args([
                "delete",
                "secret",
                "-n",
                "kube-system",
                "--ignore-not-found",
            ])
            .arg(format!("bootstrap-token-{}", self.token_id))
            .output();
    }
}

/// Connections to 127.0.0.1:<port> inside a network namespace, carried to 127.0.0.1:<port> on
/// the host; stopped when dropped.
pub struct NetnsRelay {
    tasks: Vec<tokio::task::JoinHandle<()>>,
}

impl NetnsRelay {
    /// Listens inside the namespace pinned at `netns` on each of `ports` (loopback).
    pub fn start(netns: &Path, ports: &[u16]) -> std::io::Result<NetnsRelay> {
        let mut tasks = Vec::new();
        for &port in ports {
            let listener = listen_in(netns, port)?;
            let listener = tokio::net::TcpListener::from_std(listener)?;
            tasks.push(tokio::spawn(async move {
                while let Ok((mut inside, _)) = listener.accept().await {
                    tokio::spawn(async move {
                        // Made by this task's thread, in the host's network namespace.
                        if let Ok(mut host) =
                            tokio::net::TcpStream::connect(("127.0.0.1", port)).await
                        {
                            let _ = tokio::io::copy_bidirectional(&mut inside, &mut host).await;
                        }
                    });
                }
            }));
        }
        Ok(NetnsRelay { tasks })
    }
}

impl Drop for NetnsRelay {
    fn drop(&mut self) {
        for task in &self.tasks {
            task.abort();
        }
    }
}

/// A listener on 127.0.0.1:`port` in the namespace at `netns`: bound by a thread of its own
/// that joins the namespace and ends (no other thread ever changes namespace). A socket stays
/// in the namespace it was made in.
fn listen_in(netns: &Path, port: u16) -> std::io::Result<std::net::TcpListener> {
    let file = std::fs::File::open(netns)?;
    std::thread::spawn(move || {
        // SAFETY: setns(2) on an open namespace file, for this thread only.
        if unsafe { libc::setns(file.as_raw_fd(), libc::CLONE_NEWNET) } != 0 {
            return Err(std::io::Error::last_os_error());
        }
        let listener = std::net::TcpListener::bind(("127.0.0.1", port))?;
        listener.set_nonblocking(true)?;
        Ok(listener)
    })
    .join()
    .map_err(|_| std::io::Error::other("the namespace thread panicked"))?
}
