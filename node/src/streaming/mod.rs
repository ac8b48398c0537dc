//! The kubelet side of Kubernetes' streaming protocols over SPDY/3.1: what the kube-apiserver
//! speaks to a kubelet for `kubectl exec`, `kubectl attach` and `kubectl port-forward` (kubectl
//! talks WebSocket to the apiserver, which translates to SPDY toward the node).
//!
//! Where to start: the HTTP server calls [`handshake::negotiate`] on the request headers with
//! [`remotecommand::PROTOCOLS`] or [`portforward::PROTOCOLS`], answers `101 Switching Protocols`
//! with the headers it returns, and hands the upgraded connection to
//! [`remotecommand::serve_remotecommand`] (exec/attach) or [`portforward::serve_portforward`].
//! Both run one [`spdy::Session`]: SPDY/3.1 framing, zlib header blocks with the SPDY/3
//! dictionary, and flow control.
//!
//! - [`spdy`]: frames, header compression, and the server-side session (streams with headers,
//!   async read/write);
//! - [`handshake`]: the `Upgrade: SPDY/3.1` and `X-Stream-Protocol-Version` negotiation;
//! - [`remotecommand`]: exec/attach streams (`error`, `stdin`, `stdout`, `stderr`, `resize`), the
//!   exit status written as a `metav1.Status`;
//! - [`portforward`]: `data`/`error` stream pairs per `requestID`, one forward per pair.

pub mod handshake;
pub mod idle;
pub mod portforward;
pub mod remotecommand;
pub mod spdy;
pub mod websocket;

#[cfg(test)]
mod bounds_tests;
#[cfg(test)]
mod tests;

use std::time::Duration;

/// Everything that can go wrong in streaming. Each variant says whether retrying can help.
#[derive(Debug, thiserror::Error)]
pub enum Error {
    /// The request lacks `Connection: Upgrade` / `Upgrade: SPDY/3.1` (HTTP 400). Not retryable.
    #[error(
        "unable to upgrade: missing upgrade headers in request (want Connection: Upgrade, Upgrade: SPDY/3.1)"
    )]
    MissingUpgradeHeaders,
    /// The request names no `X-Stream-Protocol-Version` (HTTP 400). Not retryable.
    #[error("unable to upgrade: X-Stream-Protocol-Version is required")]
    MissingProtocolVersion,
    /// No protocol the client offers is one the server speaks (HTTP 403, with
    /// `X-Accepted-Stream-Protocol-Versions`). Not retryable.
    #[error(
        "unable to upgrade: unable to negotiate protocol: client supports {client:?}, server accepts {server:?}"
    )]
    NoCommonProtocol {
        client: Vec<String>,
        server: Vec<String>,
    },
    /// A query parameter of an exec/attach request is malformed (HTTP 400). Not retryable.
    #[error("invalid query parameter {name}={value:?}: {reason}")]
    InvalidOption {
        name: &'static str,
        value: String,
        reason: &'static str,
    },
    /// Exec/attach asked for none of stdin, stdout, stderr (HTTP 400). Not retryable.
    #[error("you must specify at least 1 of stdin, stdout, stderr")]
    NoStreamsRequested,
    /// Exec without a `command` parameter (HTTP 400). Not retryable.
    #[error("you must specify a command for exec")]
    MissingCommand,
    /// A negotiated protocol name this module does not implement (a caller bug). Not retryable.
    #[error("unsupported stream protocol {0:?}")]
    UnsupportedProtocol(String),
    /// The peer broke SPDY (a malformed or illegal frame); the session was ended with GOAWAY
    /// PROTOCOL_ERROR. Not retryable on this connection.
    #[error("SPDY protocol error: {0}")]
    Protocol(String),
    /// A header block failed to (de)compress; the shared zlib context is lost, so the session
    /// ended. Not retryable on this connection.
    #[error("SPDY header compression: {0}")]
    Compression(String),
    /// The client did not open all expected streams in time. Retryable (a new request).
    #[error("timed out waiting for client to create streams")]
    StreamCreationTimeout,
    /// The session ended (peer closed, GOAWAY, or local shutdown) while the stream was in use.
    /// Not retryable on this connection.
    #[error("SPDY session closed")]
    SessionClosed,
    /// Write on a stream this side already finished, or that the peer reset. Not retryable.
    #[error("SPDY stream {0} is closed")]
    StreamClosed(u32),
    /// The transport failed. Retryable by the client with a new connection.
    #[error("streaming transport: {0}")]
    Io(#[from] std::io::Error),
}

/// `Result` with this module's [`Error`].
pub type Result<T, E = Error> = std::result::Result<T, E>;

impl Error {
    /// The HTTP status to answer with when the error happens before the upgrade, as the kubelet
    /// does (`None` for errors that only happen after it).
    pub fn http_status(&self) -> Option<u16> {
        match self {
            Error::MissingUpgradeHeaders
            | Error::MissingProtocolVersion
            | Error::InvalidOption { .. }
            | Error::NoStreamsRequested
            | Error::MissingCommand => Some(400),
            Error::NoCommonProtocol { .. } => Some(403),
            Error::UnsupportedProtocol(_) => Some(500),
            _ => None,
        }
    }
}

/// Timeouts and session settings shared by exec/attach and port-forward.
#[derive(Clone, Debug)]
pub struct StreamingConfig {
    /// How long the client has to open the streams it announced. 30 s is the kubelet's
    /// `DefaultStreamCreationTimeout`.
    pub stream_creation_timeout: Duration,
    /// SPDY session settings.
    pub session: spdy::SessionConfig,
    /// A session with no traffic either way for this long is closed
    /// (`--streaming-connection-idle-timeout`, 4 h by default, as the kubelet's); `None` never.
    /// Applied around the whole upgraded connection by [`idle::serve_until_idle`].
    pub idle_timeout: Option<Duration>,
}

impl Default for StreamingConfig {
    fn default() -> Self {
        StreamingConfig {
            stream_creation_timeout: Duration::from_secs(30),
            session: spdy::SessionConfig::default(),
            idle_timeout: Some(Duration::from_secs(4 * 60 * 60)),
        }
    }
}
