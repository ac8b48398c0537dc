//! The [`Provider`] seam carried over a Unix socket, so Wasm guests live in a long-lived runtime
//! process (`wasm-kubelet runtime`) and survive a restart of the agent.
//!
//! Two halves, one wire ([`wire`]):
//! - the runtime process serves its real provider with [`serve`] on a socket made by [`bind`]
//!   (mode 0600 in a 0700 directory; the server also refuses peers of another uid);
//! - the agent uses [`RemoteProvider`] as its `Arc<dyn Provider>`: [`RemoteProvider::connect`]
//!   makes the control connection (a `Hello` answered by the runtime's [`RuntimeIdentity`]),
//!   every trait method is a request on it, and each exec and attach gets a connection of its
//!   own. [`RemoteProvider::identity`] says which runtime process is answering, so the agent can
//!   tell a reconnect to the same runtime from a runtime that restarted (its pods are gone).
//!
//! When the runtime cannot be reached every call is
//! [`ProviderError::Unavailable`](provider_api::ProviderError::Unavailable) (methods without a
//! `Result` say "unknown" instead: `status` is NotReady, `image_status` None); nothing waits
//! for it forever. Start at [`RemoteProvider`] for the client and [`serve`] for the server.

use provider_api::{Provider, RuntimeInfo};
use serde::{Deserialize, Serialize};

mod client;
mod server;
pub mod wire;

pub use client::RemoteProvider;
pub use server::{bind, serve};

/// The version of the wire protocol ([`wire`]). Both sides must speak the same one: the agent
/// and the runtime are the same binary, so a mismatch means an upgraded agent found an old
/// runtime still running.
pub const PROTOCOL_VERSION: u32 = 1;

/// Who answered: changes when the runtime process restarts.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RuntimeIdentity {
    /// The protocol version the runtime speaks ([`PROTOCOL_VERSION`]).
    pub protocol: u32,
    /// The runtime process's pid.
    pub pid: u32,
    /// Unique per runtime process start (`<start unix nanos>-<pid>`): two answers with the same
    /// instance come from the same process and the same pods.
    pub instance: String,
    /// What the runtime runs.
    pub runtime_info: RuntimeInfo,
}

impl RuntimeIdentity {
    /// This process's identity, serving `provider`: the instance is made now (each [`serve`]
    /// call is one runtime start; the runtime mode calls it once per process).
    pub(crate) fn new(provider: &dyn Provider) -> Self {
        let nanos = std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_nanos())
            .unwrap_or(0);
        let pid = std::process::id();
        RuntimeIdentity {
            protocol: PROTOCOL_VERSION,
            pid,
            instance: format!("{nanos}-{pid}"),
            runtime_info: provider.runtime_info(),
        }
    }
}

#[cfg(test)]
mod tests;
