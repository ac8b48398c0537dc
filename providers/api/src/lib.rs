//! The runtime seam of wasm-kubelet.
//!
//! The node (the `wasm-kubelet` crate) owns every piece of Kubernetes state: pods, their
//! lifecycle, restarts, probes and status. A [`Provider`] only executes, and speaks in the small
//! types of this crate, never in `k8s_openapi` structs, so a provider can be faked in a unit test
//! and a second backend (containerd) plugs in without touching node logic.
//!
//! Start at [`Provider`]. The CRI-shaped verbs (images, sandboxes, containers, logs, exec, stats)
//! join the trait as the node learns to run pods; today it carries what node registration needs.

use std::fmt;

/// What a provider runs, reported on the Node as `status.nodeInfo.containerRuntimeVersion`
/// in the CRI's `<name>://<version>` form.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RuntimeInfo {
    /// A short lowercase name, e.g. `wasmtime`.
    pub name: String,
    /// The runtime's own version, e.g. `48.0.8`.
    pub version: String,
}

impl fmt::Display for RuntimeInfo {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}://{}", self.name, self.version)
    }
}

/// Whether a provider can run pods right now. The node's Ready condition follows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum RuntimeStatus {
    /// The runtime works.
    Ready,
    /// The runtime cannot run pods; the message says why, for the Ready condition.
    NotReady { message: String },
}

/// Errors a provider reports. Each variant says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum ProviderError {
    /// The runtime could not be set up (bad engine settings, missing host support).
    /// Not retryable: the configuration has to change.
    #[error("runtime setup failed: {0}")]
    Setup(String),
}

/// A pod runtime, CRI-shaped: it executes, it does not decide.
#[async_trait::async_trait]
pub trait Provider: Send + Sync + 'static {
    /// Name and version of the runtime behind this provider.
    fn runtime_info(&self) -> RuntimeInfo;

    /// A cheap health check, called every node-status interval.
    async fn status(&self) -> RuntimeStatus;
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn runtime_info_renders_in_cri_form() {
        let info = RuntimeInfo { name: "wasmtime".into(), version: "48.0.8".into() };
        assert_eq!(info.to_string(), "wasmtime://48.0.8");
    }
}
