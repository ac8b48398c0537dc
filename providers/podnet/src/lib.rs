//! Pause-free pod sandboxes for the container provider: a pod's network, IPC and UTS
//! namespaces created by the agent and pinned by bind mounts (no pause process), and the pod
//! network from real CNI plugins.
//!
//! Start with [`PodNamespaces::create`] (the namespaces, [`PodNamespaces::paths`] for the
//! containers' OCI specs), then [`PodNetwork::setup`] with [`PodNamespaces::netns_path`] (the
//! pod's IPs). Tear down in the other order: [`PodNetwork::teardown`], then
//! [`PodNamespaces::remove`]. After an agent restart, [`PodNamespaces::open`] and
//! [`PodNetwork::addresses_of`] find what is still there. The node writes its network from
//! `--pod-cidr` with [`Conflist::bridge`]. `hostNetwork` pods: [`Sharing::Host`], and no
//! `PodNetwork` call at all. docs/podnet.md says how it works and what is tested.

mod cni;
mod conflist;
mod error;
mod names;
mod network;
mod ns;

pub use cni::{
    Attachment, CniCommand, CniInterface, CniIp, CniResult, CniRoute, PluginRunner,
    DEFAULT_PLUGIN_DIR, DEFAULT_PLUGIN_TIMEOUT,
};
pub use conflist::{Conflist, CNI_VERSION};
pub use error::{PodNetError, Result};
pub use network::{PodAddresses, PodNetwork, PodRef, PortMapping, POD_IFNAME};
pub use ns::{NamespacePaths, NamespaceSpec, PodNamespaces, Sharing};

#[cfg(test)]
mod tests;
