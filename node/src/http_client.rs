//! The agent's own outgoing HTTP GETs that are not API-server calls: HTTP probes and lifecycle
//! hooks (`probes::action`) and the `--manifest-url` fetch (`pods::static_source`), on hyper's
//! client (hyper-util's legacy `Client`) with rustls through hyper-rustls, the versions kube's
//! client is built on. A leaf module: the callers choose the TLS settings, the headers, the body
//! cap and the timeout.

use std::error::Error as StdError;

use bytes::Bytes;
use http_body_util::Empty;
use hyper_rustls::HttpsConnector;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;

/// A client for bodiless requests (GETs).
pub type OneShotClient = Client<HttpsConnector<HttpConnector>, Empty<Bytes>>;

/// A client for GETs over HTTP/1.1: `http://` over TCP, `https://` over TLS with `tls` (its
/// ALPN list must be empty; HTTP/1.1 is the only protocol offered). No connection pool: every
/// request has its own connection, closed after its response, as the kubelet's prober
/// (`DisableKeepAlives`) does. Header names go out in canonical case (`User-Agent`), as Go's
/// client writes them.
pub fn one_shot(tls: &rustls::ClientConfig) -> OneShotClient {
    let connector = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(tls.clone())
        .https_or_http()
        .enable_http1()
        .build();
    Client::builder(TokioExecutor::new())
        .pool_max_idle_per_host(0)
        .http1_title_case_headers(true)
        .build(connector)
}

/// A client error as one line, and what kind it was.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Failure {
    /// The connection (TCP, or the TLS handshake) failed; no request was sent.
    pub connect: bool,
    /// A TLS error is among the causes (a certificate not trusted, a handshake failure).
    pub tls: bool,
    /// The causes under hyper-util's wrapper, joined by ": ".
    pub message: String,
}

impl std::fmt::Display for Failure {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(&self.message)
    }
}

/// Describes a client error by its causes (hyper-util's own text, `client error (Connect)`,
/// names only the stage). An `io::Error` wrapping another error displays as that error, so its
/// inner error is its cause here and repeated text is said once.
pub fn failure(e: &hyper_util::client::legacy::Error) -> Failure {
    let mut parts: Vec<String> = Vec::new();
    let mut tls = false;
    let mut next: Option<&(dyn StdError + 'static)> = e.source();
    while let Some(cause) = next {
        tls |= cause.is::<rustls::Error>();
        let text = cause.to_string();
        if parts.last() != Some(&text) {
            parts.push(text);
        }
        next = match cause.downcast_ref::<std::io::Error>() {
            Some(io) => io.get_ref().map(|inner| inner as &(dyn StdError + 'static)),
            None => cause.source(),
        };
    }
    let message = if parts.is_empty() {
        e.to_string()
    } else {
        parts.join(": ")
    };
    Failure {
        connect: e.is_connect(),
        tls,
        message,
    }
}
