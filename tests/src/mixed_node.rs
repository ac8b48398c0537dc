//! A mixed node for one test: an agent with `--container-runtime-endpoint` (the local
//! cluster's containerd) and a pod CIDR of its own, and the clean-up of what such a node leaves
//! on the host (containerd's containers, images and namespace; the pod bridge).
//!
//! Start at [`MixedNode::start`]. Network safety: the pod CIDR is a /24 in 10.0.0.0/8 that no
//! route of this host covers ([`free_pod_cidr`]); the node writes a conflist that does not
//! route (no isGateway, no default route, no masquerading), so `net.ipv4.ip_forward` stays as
//! it was; a test's only traffic is to its pods' addresses, in namespaces its agent made.

use std::path::{Path, PathBuf};
use std::process::Command;

use k8s_openapi::api::core::v1::Pod;

use crate::{push_examples, unique_name, wait_registered, workspace_root, Agent, Cluster};

/// A running mixed node; dropping it kills the agent, then cleans containerd and the bridge.
pub struct MixedNode {
    /// Dropped before `leftovers` (fields drop in order): the agent is gone before the clean-up.
    pub agent: Agent,
    pub leftovers: Leftovers,
    /// The node's pod CIDR, e.g. `10.123.45.0/24`.
    pub cidr: String,
}

impl MixedNode {
    /// Pushes the wasm-examples, starts an agent named after `what` on containerd with a free
    /// pod CIDR, its pod logs in `<agent dir>/logs` and `extra` flags, and waits for its Node.
    pub async fn start(what: &str, extra: &[&str]) -> MixedNode {
        push_examples();
        let cluster = Cluster::get();
        let socket = cluster.var("LC_CONTAINERD_SOCKET").to_string();
        let cidr = free_pod_cidr();
        let name = unique_name(what);
        let dir = workspace_root().join("target/it").join(&name);
        // Known before the agent starts, so what it leaves is cleaned even if it never registers.
        let leftovers = Leftovers {
            socket: socket.clone(),
            namespace: format!("wasm-kubelet-{name}"),
            root: dir.join("root"),
        };
        let logs = format!("--pod-logs-dir={}", dir.join("logs").display());
        let endpoint = format!("--container-runtime-endpoint=unix://{socket}");
        let pod_cidr = format!("--pod-cidr={cidr}");
        let mut args = vec![logs.as_str(), endpoint.as_str(), pod_cidr.as_str()];
        args.extend_from_slice(extra);
        let agent = Agent::start(&name, &args).expect("the agent starts");
        wait_registered(&agent).await;
        MixedNode {
            agent,
            leftovers,
            cidr,
        }
    }

    /// The local registry's busybox image (`deploy/build-images`).
    pub fn busybox() -> String {
        format!("{}/busybox:1", Cluster::get().var("REGISTRY"))
    }

    /// The node's root directory.
    pub fn root(&self) -> PathBuf {
        self.agent.dir.join("root")
    }

    /// `ctr` against this node's containerd namespace; stdout.
    pub fn ctr(&self, args: &[&str]) -> String {
        self.leftovers.ctr(args)
    }
}

/// A /24 in 10.0.0.0/8 that no route of this host covers (so the node's bridge takes nothing
/// from the machine's own network), different for each call.
pub fn free_pod_cidr() -> String {
    let routes = String::from_utf8(
        Command::new("ip")
            .args(["-4", "route", "show", "table", "all"])
            .output()
            .expect("ip route")
            .stdout,
    )
    .unwrap_or_default();
    let mut seed = [0u8; 8];
    std::fs::File::open("/dev/urandom")
        .and_then(|mut f| std::io::Read::read_exact(&mut f, &mut seed))
        .expect("urandom");
    for i in 0..512u32 {
        let n = u64::from_le_bytes(seed).wrapping_add(u64::from(i) * 7919);
        // 10.100.0.0 - 10.227.255.0: away from the ranges clusters commonly use.
        let (b, c) = (100 + (n % 128) as u8, ((n >> 8) % 256) as u8);
        let prefix = format!("10.{b}.{c}.");
        if !routes.contains(&prefix) && !routes.contains(&format!("10.{b}.0.0/16")) {
            return format!("10.{b}.{c}.0/24");
        }
    }
    panic!("no free /24 in 10.0.0.0/8:\n{routes}");
}

/// `net.ipv4.ip_forward`, which no test may change.
pub fn ip_forward() -> String {
    std::fs::read_to_string("/proc/sys/net/ipv4/ip_forward")
        .expect("ip_forward")
        .trim()
        .to_string()
}

pub fn link_exists(name: &str) -> bool {
    Path::new("/sys/class/net").join(name).exists()
}

pub fn pod_ip(pod: &Pod) -> Option<String> {
    pod.status.as_ref()?.pod_ip.clone()
}

/// The conflist the node wrote under its root, if any.
pub fn conflist_of(root: &Path) -> Option<serde_json::Value> {
    let file = std::fs::read_dir(root.join("pod-network/cni/net.d"))
        .ok()?
        .filter_map(Result::ok)
        .find(|e| e.path().extension().is_some_and(|x| x == "conflist"))?
        .path();
    serde_json::from_slice(&std::fs::read(file).ok()?).ok()
}

/// The bridge named in the conflist the node wrote under its root; asserts the network the
/// node writes by default never routes.
pub fn bridge_of(root: &Path) -> String {
    let list = conflist_of(root).expect("the node wrote its conflist");
    let bridge = &list["plugins"][0];
    assert_eq!(bridge["isGateway"], false, "{list}");
    assert_eq!(bridge["ipMasq"], false, "{list}");
    assert!(bridge["ipam"].get("routes").is_none(), "{list}");
    bridge["bridge"].as_str().expect("bridge name").to_string()
}

/// The pod's host-side veth, from the attachment record the node keeps while it is attached.
pub fn veth_of(root: &Path, uid: &str) -> String {
    let record: PathBuf = root
        .join("pod-network/cni/attachments")
        .join(format!("{uid}.json"));
    let record: serde_json::Value =
        serde_json::from_slice(&std::fs::read(&record).expect("attachment record")).expect("json");
    record["result"]["interfaces"]
        .as_array()
        .expect("interfaces")
        .iter()
        .filter(|i| i.get("sandbox").is_none())
        .filter_map(|i| i["name"].as_str())
        .find(|name| name.starts_with("veth"))
        .expect("a host veth in the CNI result")
        .to_string()
}

/// What a mixed node leaves on the host when its test ends, passed or not (its agent is killed
/// with SIGKILL, and pods outlive agents): the containers, images and namespace in containerd
/// (with `ctr`), and the bridge. Cleaned when dropped.
pub struct Leftovers {
    pub socket: String,
    pub namespace: String,
    /// The node's root dir: the bridge is the one its conflist names, if it got that far.
    pub root: PathBuf,
}

impl Leftovers {
    fn ctr(&self, args: &[&str]) -> String {
        Command::new("ctr")
            .args(["--address", &self.socket, "-n", &self.namespace])
            .args(args)
            .output()
            .map(|o| String::from_utf8_lossy(&o.stdout).into_owned())
            .unwrap_or_default()
    }
}

impl Drop for Leftovers {
    fn drop(&mut self) {
        for id in self.ctr(&["tasks", "list", "-q"]).lines() {
            self.ctr(&["tasks", "kill", "-a", "-s", "SIGKILL", id]);
            self.ctr(&["tasks", "delete", "-f", id]);
        }
        for id in self.ctr(&["containers", "list", "-q"]).lines() {
            self.ctr(&["containers", "delete", id]);
            self.ctr(&["snapshots", "delete", id]);
        }
        // Leases first: the images' synchronous delete then collects everything.
        for lease in self.ctr(&["leases", "list", "-q"]).lines() {
            self.ctr(&["leases", "delete", lease]);
        }
        for image in self.ctr(&["images", "list", "-q"]).lines() {
            self.ctr(&["images", "delete", "--sync", image]);
        }
        if let Some(bridge) = conflist_of(&self.root)
            .and_then(|list| list["plugins"][0]["bridge"].as_str().map(str::to_string))
        {
            let _ = Command::new("ip").args(["link", "del", &bridge]).output();
        }
        // containerd refuses to delete a namespace until its garbage collection has freed the
        // snapshots and content just released: poll it (clean-up only, at most 10 s).
        let mut last = String::new();
        for _ in 0..100 {
            let Ok(out) = Command::new("ctr")
                .args(["--address", &self.socket, "namespaces", "remove"])
                .arg(&self.namespace)
                .output()
            else {
                return;
            };
            last = String::from_utf8_lossy(&out.stderr).into_owned();
            if out.status.success() || last.contains("not found") {
                return;
            }
            std::thread::sleep(std::time::Duration::from_millis(100));
        }
        eprintln!(
            "containerd namespace {} left behind: {last}",
            self.namespace
        );
    }
}
