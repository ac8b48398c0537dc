//! The pod network of container pods: each pod's network, IPC and UTS namespaces made and
//! pinned by the agent (providers/podnet, no pause process) and its `eth0` on the node's CNI
//! bridge network, written from the pod CIDR when the provider starts.
//!
//! Safety on a shared host: by default the network does not route. The bridge plugin's
//! `isGateway` (which turns on `net.ipv4.ip_forward` for the whole node) is off, pods get no
//! default route and no masquerading: a pod reaches the node's bridge address and the other
//! pods of the node, nothing beyond. The provider gives the bridge the CIDR's first address
//! itself, so the node reaches its pods. [`PodNetworkOptions::gateway`] (the node's
//! `--pod-network-gateway`) is the operator's explicit choice of the routed network (isGateway,
//! a default route via the bridge, forwarding on).

use std::net::IpAddr;
use std::path::{Path, PathBuf};

use ipnet::IpNet;
use pod_network::{
    Conflist, NamespaceSpec, PluginRunner, PodNamespaces, PodNetwork, PodRef, Sharing,
    DEFAULT_PLUGIN_DIR,
};
use provider_api::{ProviderError, SandboxConfig};
use sha2::Digest;

use crate::spec::{Namespace, SandboxNamespaces};

/// What the node's configuration sets for the pod network.
#[derive(Debug, Clone)]
pub struct PodNetworkOptions {
    /// `--pod-cidr` (or the Node's `spec.podCIDR`): where pod IPs come from.
    pub pod_cidr: IpNet,
    /// A directory only the agent writes (under its root dir): pinned namespaces, the conflist,
    /// host-local's allocations and the attachment records live below it. Its path also names
    /// the bridge, so two nodes on one host do not share one.
    pub root: PathBuf,
    /// `--pod-network-gateway`: the bridge plugin's `isGateway` and a default route for pods.
    /// It turns on IP forwarding on the node. Off by default.
    pub gateway: bool,
    /// Where the CNI plugins are (`/usr/lib/cni`, Debian's containernetworking-plugins).
    pub plugin_dir: PathBuf,
}

impl PodNetworkOptions {
    pub fn new(pod_cidr: IpNet, root: PathBuf) -> Self {
        Self {
            pod_cidr,
            root,
            gateway: false,
            plugin_dir: PathBuf::from(DEFAULT_PLUGIN_DIR),
        }
    }

    /// `wk` and 10 hex digits of the root's hash: unique per node on a host, and within the
    /// 15 characters of an interface name.
    pub fn bridge_name(&self) -> String {
        format!("wk{}", &self.root_hash()[..10])
    }

    /// The CNI network's name.
    pub fn network_name(&self) -> String {
        format!("wasm-kubelet-{}", &self.root_hash()[..10])
    }

    fn root_hash(&self) -> String {
        let digest = sha2::Sha256::digest(self.root.as_os_str().as_encoded_bytes());
        digest.iter().map(|b| format!("{b:02x}")).collect()
    }

    /// The node's address on the bridge: the CIDR's first address (what host-local reserves
    /// as the gateway, so no pod gets it).
    pub fn bridge_address(&self) -> Result<IpNet, ProviderError> {
        let net = self.pod_cidr.trunc();
        let first = net.hosts().next().ok_or_else(|| {
            ProviderError::Setup(format!("pod CIDR {net} has no room for the node and pods"))
        })?;
        IpNet::new(first, net.prefix_len())
            .map_err(|e| ProviderError::Setup(format!("pod CIDR {net}: {e}")))
    }

    /// The conflist the node writes: podnet's bridge network, without routing unless asked.
    pub fn conflist(&self) -> Result<Conflist, ProviderError> {
        let mut list = Conflist::bridge(
            &self.network_name(),
            &self.bridge_name(),
            self.pod_cidr,
            &self.root.join("cni").join("ipam"),
        )
        .map_err(setup)?;
        if !self.gateway {
            let bridge = &mut list.plugins[0];
            bridge.insert("isGateway".into(), serde_json::Value::Bool(false));
            if let Some(ipam) = bridge.get_mut("ipam").and_then(|v| v.as_object_mut()) {
                ipam.remove("routes");
            }
        }
        Ok(list)
    }
}

fn setup(e: pod_network::PodNetError) -> ProviderError {
    ProviderError::Setup(format!("pod network: {}", provider_api::one_line(&e)))
}

fn create_error(e: pod_network::PodNetError) -> ProviderError {
    let text = format!("pod network: {}", provider_api::one_line(&e));
    match e {
        pod_network::PodNetError::Invalid { .. } => ProviderError::Create(text),
        _ => ProviderError::Io(text),
    }
}

/// The node's pod network, ready for pods.
pub(crate) struct Network {
    namespaces_root: PathBuf,
    network: PodNetwork,
}

impl Network {
    /// Writes the conflist and (without the gateway option) makes and addresses the bridge.
    pub(crate) async fn start(options: &PodNetworkOptions) -> Result<Self, ProviderError> {
        let conflist = options.conflist()?;
        conflist
            .write_to(&options.root.join("cni").join("net.d"))
            .map_err(setup)?;
        if !options.gateway {
            ensure_bridge(&options.bridge_name(), options.bridge_address()?).await?;
        }
        let runner = PluginRunner {
            plugin_dirs: vec![options.plugin_dir.clone()],
            ..PluginRunner::default()
        };
        tracing::info!(
            cidr = %options.pod_cidr,
            bridge = options.bridge_name(),
            gateway = options.gateway,
            "pod network ready"
        );
        Ok(Self {
            namespaces_root: options.root.join("namespaces"),
            network: PodNetwork::new(
                conflist,
                runner,
                options.root.join("cni").join("attachments"),
            ),
        })
    }

    /// The pod's namespaces (made, or found after a restart) and its network; its IPs (none
    /// for a hostNetwork pod, which uses the node's network and UTS namespaces).
    pub(crate) async fn setup(
        &self,
        config: &SandboxConfig,
    ) -> Result<(SandboxNamespaces, Vec<IpAddr>), ProviderError> {
        let root = self.namespaces_root.clone();
        let uid = config.pod_uid.clone();
        let spec = NamespaceSpec {
            hostname: hostname(&config.name),
            network: if config.host_network {
                Sharing::Host
            } else {
                Sharing::Pod
            },
            ipc: Sharing::Pod,
        };
        // Namespaces are made by a thread of their own that podnet joins: blocking work.
        let namespaces =
            tokio::task::spawn_blocking(move || match PodNamespaces::open(&root, &uid)? {
                Some(ns) => Ok(ns),
                None => PodNamespaces::create(&root, &uid, &spec),
            })
            .await
            .map_err(|e| ProviderError::Io(format!("pod namespaces: {e}")))?
            .map_err(create_error)?;
        let pod = PodRef {
            uid: config.pod_uid.clone(),
            namespace: config.namespace.clone(),
            name: config.name.clone(),
        };
        let addresses = match self.network.attach(&pod, &namespaces, &[]).await {
            Ok(addresses) => addresses,
            Err(e) => {
                let _ = tokio::task::spawn_blocking(move || namespaces.remove()).await;
                return Err(create_error(e));
            }
        };
        let paths = namespaces.paths();
        let join = |p: Option<PathBuf>| p.map_or(Namespace::Node, Namespace::Join);
        let sandbox = SandboxNamespaces {
            network: join(paths.network),
            ipc: join(paths.ipc),
            uts: join(paths.uts),
        };
        Ok((sandbox, addresses.map(|a| a.ips).unwrap_or_default()))
    }

    /// CNI DEL, then the namespaces unpinned. Nothing there: nothing to do.
    pub(crate) async fn teardown(&self, pod_uid: &str) -> Result<(), ProviderError> {
        self.network.teardown(pod_uid).await.map_err(create_error)?;
        let root = self.namespaces_root.clone();
        let uid = pod_uid.to_string();
        tokio::task::spawn_blocking(move || match PodNamespaces::open(&root, &uid)? {
            Some(ns) => ns.remove(),
            None => Ok(()),
        })
        .await
        .map_err(|e| ProviderError::Io(format!("pod namespaces: {e}")))?
        .map_err(create_error)
    }
}

/// The pod's hostname as Kubernetes makes it from the pod name: at most 63 characters, no
/// trailing `-` or `.`.
fn hostname(pod_name: &str) -> String {
    let cut: String = pod_name.chars().take(63).collect();
    cut.trim_end_matches(['-', '.']).to_string()
}

/// Makes the bridge (when missing), gives it `address` and sets it up, with iproute2.
async fn ensure_bridge(name: &str, address: IpNet) -> Result<(), ProviderError> {
    let ip = ["/usr/sbin/ip", "/sbin/ip", "/usr/bin/ip", "/bin/ip"]
        .into_iter()
        .map(Path::new)
        .find(|p| p.exists())
        .ok_or_else(|| ProviderError::Setup("pod network: iproute2's `ip` not found".into()))?;
    let run = |args: Vec<String>| async move {
        let out = tokio::process::Command::new(ip)
            .args(&args)
            .env_clear()
            .output()
            .await
            .map_err(|e| ProviderError::Setup(format!("pod network: running ip: {e}")))?;
        Ok::<_, ProviderError>((out.status.success(), out.stderr))
    };
    let (made, err) = run(vec![
        "link".into(),
        "add".into(),
        name.into(),
        "type".into(),
        "bridge".into(),
    ])
    .await?;
    if !made && !String::from_utf8_lossy(&err).contains("File exists") {
        return Err(ProviderError::Setup(format!(
            "pod network: making bridge {name}: {}",
            String::from_utf8_lossy(&err).trim()
        )));
    }
    for args in [
        vec![
            "addr".to_string(),
            "replace".into(),
            address.to_string(),
            "dev".into(),
            name.into(),
        ],
        vec!["link".into(), "set".into(), name.into(), "up".into()],
    ] {
        let (ok, err) = run(args.clone()).await?;
        if !ok {
            return Err(ProviderError::Setup(format!(
                "pod network: ip {}: {}",
                args.join(" "),
                String::from_utf8_lossy(&err).trim()
            )));
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_default_conflist_never_routes_and_names_are_per_root() {
        let a = PodNetworkOptions::new("10.77.3.0/24".parse().unwrap(), "/var/lib/a".into());
        let b = PodNetworkOptions::new("10.77.3.0/24".parse().unwrap(), "/var/lib/b".into());
        assert_ne!(a.bridge_name(), b.bridge_name());
        assert!(a.bridge_name().len() <= 15);
        let list = serde_json::to_value(a.conflist().unwrap()).unwrap();
        let bridge = &list["plugins"][0];
        assert_eq!(bridge["type"], "bridge");
        assert_eq!(bridge["bridge"], a.bridge_name());
        assert_eq!(bridge["isGateway"], false);
        assert_eq!(bridge["ipMasq"], false);
        assert!(bridge["ipam"].get("routes").is_none(), "{bridge}");
        assert_eq!(bridge["ipam"]["dataDir"], "/var/lib/a/cni/ipam");
        assert_eq!(a.bridge_address().unwrap().to_string(), "10.77.3.1/24");

        let routed = PodNetworkOptions {
            gateway: true,
            ..a.clone()
        };
        let list = serde_json::to_value(routed.conflist().unwrap()).unwrap();
        assert_eq!(list["plugins"][0]["isGateway"], true);
        assert_eq!(list["plugins"][0]["ipam"]["routes"][0]["dst"], "0.0.0.0/0");
    }

    #[test]
    fn hostnames_follow_the_pod_name() {
        assert_eq!(hostname("web-0"), "web-0");
        let long = format!("{}-{}", "a".repeat(62), "b");
        assert_eq!(hostname(&long), "a".repeat(62));
    }
}
