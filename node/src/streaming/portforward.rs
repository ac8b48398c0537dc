//! The server side of `port-forward` over SPDY (the kubelet's `cri/streaming/portforward`,
//! sub-protocol `portforward.k8s.io`).
//!
//! Where to start: [`serve_portforward`]. For every forwarded connection the client opens two
//! streams with the same `requestID` header: `streamType: data` (the bytes) and
//! `streamType: error` (where this side reports failure), both naming the pod `port`. Once a
//! pair is complete the [`PortForwardHandler`] gets the port and the data stream as one
//! in-memory pipe; a pair left incomplete past the stream creation timeout is dropped.

use std::collections::HashMap;
use std::future::Future;
use std::sync::Arc;

use bytes::Bytes;
use serde::Serialize;
use tokio::io::DuplexStream;
use tokio::task::JoinSet;
use tokio::time::Instant;
use tracing::debug;

use super::spdy::{IncomingStream, Session, SpdyStream, RST_CANCEL};
use super::{Result, StreamingConfig};

/// The only port-forward sub-protocol.
pub const PROTOCOLS: &[&str] = &["portforward.k8s.io"];
/// Stream headers (`api.StreamType`, `api.PortHeader`, `api.PortForwardRequestIDHeader`).
pub const STREAM_TYPE_HEADER: &str = "streamType";
pub const PORT_HEADER: &str = "port";
pub const REQUEST_ID_HEADER: &str = "requestID";
pub const STREAM_TYPE_DATA: &str = "data";
pub const STREAM_TYPE_ERROR: &str = "error";

/// Connects a forwarded stream to `port` in the pod. Return when either side is done. An
/// `Err` is reported on the pair's error stream; broken-pipe and connection-reset errors let
/// the client keep the port-forward open, others ask it to close (as the kubelet decides).
pub trait PortForwardHandler: Send + Sync + 'static {
    fn forward(
        &self,
        port: u16,
        stream: DuplexStream,
    ) -> impl Future<Output = std::io::Result<()>> + Send;
}

/// The pod being forwarded to, for error messages.
#[derive(Clone, Debug, Default)]
pub struct PortForwardTarget {
    pub pod: String,
    pub uid: String,
}

/// The kubelet's `portForwardErrResponse`, written as one JSON line to the error stream.
#[derive(Serialize)]
struct ErrResponse {
    #[serde(rename = "closeConnection", skip_serializing_if = "std::ops::Not::not")]
    close_connection: bool,
    message: String,
}

#[derive(Default)]
struct Pair {
    data: Option<SpdyStream>,
    error: Option<SpdyStream>,
    port: u16,
    deadline: Option<Instant>,
}

/// Checks a new stream's headers; returns (request id, is data, port).
fn classify(stream: &IncomingStream) -> std::result::Result<(String, bool, u16), String> {
    let h = stream.headers();
    let port = h
        .get(PORT_HEADER)
        .ok_or_else(|| format!("{PORT_HEADER:?} header is required"))?;
    let port: u16 = port
        .parse()
        .map_err(|e| format!("unable to parse {port:?} as a port: {e}"))?;
    if port == 0 {
        return Err(format!("port {port:?} must be > 0"));
    }
    let is_data = match h.get(STREAM_TYPE_HEADER) {
        Some(STREAM_TYPE_DATA) => true,
        Some(STREAM_TYPE_ERROR) => false,
        Some(other) => return Err(format!("invalid stream type {other:?}")),
        None => return Err(format!("{STREAM_TYPE_HEADER:?} header is required")),
    };
    let request_id = match h.get(REQUEST_ID_HEADER) {
        Some(id) if !id.is_empty() => id.to_string(),
        // Old clients send no request id; their error and data streams have consecutive odd
        // ids, so the kubelet pairs them as (error id) and (data id - 2).
        _ if is_data => stream.id().saturating_sub(2).to_string(),
        _ => stream.id().to_string(),
    };
    Ok((request_id, is_data, port))
}

/// Serves port-forwarding on an upgraded connection until the client closes it.
pub async fn serve_portforward<IO, H>(
    io: IO,
    target: PortForwardTarget,
    handler: Arc<H>,
    config: &StreamingConfig,
) -> Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: PortForwardHandler,
{
    let mut session = Session::new(io, config.session.clone());
    let mut pairs: HashMap<String, Pair> = HashMap::new();
    let mut forwards: JoinSet<()> = JoinSet::new();
    loop {
        let next_deadline = pairs.values().filter_map(|p| p.deadline).min();
        tokio::select! {
            incoming = session.accept() => {
                let Some(incoming) = incoming else { break };
                let (request_id, is_data, port) = match classify(&incoming) {
                    Ok(c) => c,
                    Err(reason) => {
                        debug!(stream = incoming.id(), reason, "port-forward stream rejected");
                        incoming.reject(RST_CANCEL);
                        continue;
                    }
                };
                let pair = pairs.entry(request_id.clone()).or_default();
                let slot = if is_data { &mut pair.data } else { &mut pair.error };
                if slot.is_some() {
                    debug!(request_id, is_data, "stream type already assigned; rejected");
                    incoming.reject(RST_CANCEL);
                    continue;
                }
                *slot = incoming.accept();
                if pair.deadline.is_none() {
                    pair.deadline = Some(Instant::now() + config.stream_creation_timeout);
                }
                if is_data {
                    pair.port = port;
                }
                if pair.data.is_some() && pair.error.is_some() {
                    if let Some(Pair { data: Some(data), error: Some(error), port, .. }) = pairs.remove(&request_id) {
                        debug!(request_id, port, "port-forward pair complete");
                        forwards.spawn(forward_pair(handler.clone(), target.clone(), port, data, error));
                    }
                }
            }
            _ = tokio::time::sleep_until(next_deadline.unwrap_or_else(Instant::now)), if next_deadline.is_some() => {
                let now = Instant::now();
                let expired: Vec<String> = pairs
                    .iter()
                    .filter(|(_, p)| p.deadline.is_some_and(|d| d <= now))
                    .map(|(id, _)| id.clone())
                    .collect();
                for id in expired {
                    if let Some(pair) = pairs.remove(&id) {
                        debug!(request_id = id, "timed out waiting for the other stream of the pair");
                        if let Some(error) = pair.error {
                            let sender = error.sender();
                            let msg = format!("timed out waiting for streams for request {id}");
                            let _ = sender.send(Bytes::from(msg)).await;
                            let _ = sender.finish().await;
                        }
                    }
                }
            }
            Some(_) = forwards.join_next(), if !forwards.is_empty() => {}
        }
    }
    debug!("port-forward connection ended by the client");
    forwards.shutdown().await;
    session.close().await
}

async fn forward_pair<H: PortForwardHandler>(
    handler: Arc<H>,
    target: PortForwardTarget,
    port: u16,
    data: SpdyStream,
    error: SpdyStream,
) {
    let error_sender = error.sender();
    let (io, data_done) = data.into_io();
    if let Err(e) = handler.forward(port, io).await {
        let keep_open = matches!(
            e.kind(),
            std::io::ErrorKind::BrokenPipe | std::io::ErrorKind::ConnectionReset
        );
        let response = ErrResponse {
            close_connection: !keep_open,
            message: format!(
                "error forwarding port {port} to pod {}, uid {}: {e}",
                target.pod, target.uid
            ),
        };
        debug!(port, message = response.message, "port-forward failed");
        if let Ok(mut line) = serde_json::to_vec(&response) {
            line.push(b'\n');
            let _ = error_sender.send(Bytes::from(line)).await;
        }
    }
    let _ = data_done.await;
    let _ = error_sender.finish().await;
    drop(error);
}
