//! The one error type of this crate.

use std::io;
use std::path::PathBuf;
use std::time::Duration;

use crate::cni::CniCommand;

/// Result alias of this crate.
pub type Result<T, E = PodNetError> = std::result::Result<T, E>;

/// What went wrong while giving a pod its namespaces or its network.
#[derive(Debug, thiserror::Error)]
pub enum PodNetError {
    /// A name we refuse (a pod uid, hostname, interface or network name). Not retryable: the
    /// same input fails the same way.
    #[error("invalid {what} {value:?}: {reason}")]
    Invalid {
        what: &'static str,
        value: String,
        reason: &'static str,
    },

    /// A file operation on a path failed. Retryable only if its cause is transient.
    #[error("{op} {}: {source}", path.display())]
    Io {
        op: &'static str,
        path: PathBuf,
        #[source]
        source: io::Error,
    },

    /// A namespace system call failed (unshare, sethostname, the pinning bind mount). Not
    /// retryable in practice: it names a missing privilege or kernel feature.
    #[error("pod namespaces: {op}: {source}")]
    Namespace {
        op: &'static str,
        #[source]
        source: io::Error,
    },

    /// `PodNamespaces::create` found a complete set already pinned for this pod: the caller
    /// wants `PodNamespaces::open` (an agent restart), or `remove` first.
    #[error("pod {uid}: namespaces already pinned under {}", path.display())]
    AlreadyExists { uid: String, path: PathBuf },

    /// A network configuration list we cannot use. Not retryable until the file changes.
    #[error("CNI network config{}: {reason}", path.as_ref().map(|p| format!(" {}", p.display())).unwrap_or_default())]
    Config {
        path: Option<PathBuf>,
        reason: String,
    },

    /// No executable named after the plugin's `type` in any plugin directory.
    #[error("CNI plugin {plugin:?} not found in {dirs:?}")]
    PluginNotFound { plugin: String, dirs: Vec<PathBuf> },

    /// A plugin could not be started or waited for.
    #[error("CNI plugin {plugin} {command}: {source}")]
    PluginExec {
        plugin: String,
        command: CniCommand,
        #[source]
        source: io::Error,
    },

    /// A plugin reported an error: its CNI error object (`code`, `msg`, `details`) when it
    /// printed one, else its exit status and the tail of its stderr as `msg`. Retryable when
    /// `code` is 11 ("try again later", CNI spec, Error section).
    #[error("CNI plugin {plugin} {command} failed (code {code}): {msg}{}", if details.is_empty() { String::new() } else { format!(" ({details})") })]
    Plugin {
        plugin: String,
        command: CniCommand,
        /// The CNI error code; 0 when the plugin printed no error object.
        code: u32,
        msg: String,
        details: String,
        /// The plugin's exit code, `None` if a signal ended it.
        exit_code: Option<i32>,
    },

    /// A plugin ran past the deadline and was killed.
    #[error("CNI plugin {plugin} {command} did not finish within {timeout:?}; killed")]
    PluginTimeout {
        plugin: String,
        command: CniCommand,
        timeout: Duration,
    },

    /// A plugin succeeded but printed something that is not a CNI result.
    #[error("CNI plugin {plugin} {command} printed no usable result: {reason}")]
    BadResult {
        plugin: String,
        command: CniCommand,
        reason: String,
    },

    /// CHECK of a pod that has no recorded attachment.
    #[error("pod {uid} is not attached to the pod network")]
    NotAttached { uid: String },

    /// The network's ADD succeeded but gave the pod no address on an interface inside it.
    #[error("CNI network {network} gave pod {uid} no IP address")]
    NoAddress { network: String, uid: String },
}

impl PodNetError {
    /// Whether the same call may succeed later without anything else changing.
    pub fn is_retryable(&self) -> bool {
        match self {
            // CNI spec, "Error": code 11 is "Try again later".
            PodNetError::Plugin { code, .. } => *code == 11,
            PodNetError::PluginTimeout { .. } | PodNetError::PluginExec { .. } => true,
            PodNetError::Io { source, .. } => matches!(
                source.kind(),
                io::ErrorKind::Interrupted | io::ErrorKind::WouldBlock | io::ErrorKind::TimedOut
            ),
            _ => false,
        }
    }
}

pub(crate) fn io_err(
    op: &'static str,
    path: impl Into<PathBuf>,
) -> impl FnOnce(io::Error) -> PodNetError {
    let path = path.into();
    move |source| PodNetError::Io { op, path, source }
}
