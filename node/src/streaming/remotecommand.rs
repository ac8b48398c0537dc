//! The server side of `exec` and `attach` over SPDY (the kubelet's
//! `cri/streaming/remotecommand`): sub-protocols `v5`/`v4`/`v3`/`v2.channel.k8s.io` and
//! `channel.k8s.io`.
//!
//! Where to start: parse the query with [`ExecOptions::from_exec_query`] (or
//! [`ExecOptions::from_attach_query`]) before upgrading, then call [`serve_remotecommand`] with
//! the upgraded connection and an [`ExecHandler`]. The client opens one stream per channel,
//! each SYN_STREAM naming it in the `streamType` header (`error`, `stdin`, `stdout`, `stderr`,
//! `resize`); once all expected streams are there (within
//! [`StreamingConfig::stream_creation_timeout`]) the handler runs, and its outcome is written
//! to the `error` stream: a JSON `metav1.Status` for v4 and later, plain text before.

use std::future::Future;
use std::time::Duration;

use bytes::Bytes;
use serde::{Deserialize, Serialize};
use tokio::io::DuplexStream;
use tokio::sync::mpsc;
use tokio::task::JoinHandle;
use tracing::debug;

use super::spdy::{Session, SpdyStream, RST_CANCEL};
use super::{Error, Result, StreamingConfig};

/// Sub-protocols in the kubelet's order of preference (`SupportedStreamingProtocols`). v5
/// differs from v4 only over WebSocket, so over SPDY it is served as v4.
pub const PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v3.channel.k8s.io",
    "v2.channel.k8s.io",
    "channel.k8s.io",
];

/// The SYN_STREAM header naming a stream's channel (`api.StreamType`; lowercase on the wire).
pub const STREAM_TYPE_HEADER: &str = "streamType";
pub const STREAM_TYPE_ERROR: &str = "error";
pub const STREAM_TYPE_STDIN: &str = "stdin";
pub const STREAM_TYPE_STDOUT: &str = "stdout";
pub const STREAM_TYPE_STDERR: &str = "stderr";
pub const STREAM_TYPE_RESIZE: &str = "resize";

/// Once the handler has returned, how long its output may still take to drain before the
/// status is written anyway (a handler that leaked its stdout pipe must not hang the session).
const OUTPUT_DRAIN: Duration = Duration::from_secs(10);
/// Resize events a handler may leave unread before newer ones are dropped.
const RESIZE_QUEUE: usize = 16;
/// A resize stream that buffers this much without a complete JSON object is garbage.
const MAX_RESIZE_BUFFER: usize = 64 * 1024;

/// A negotiated remotecommand sub-protocol.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
pub enum Protocol {
    V1,
    V2,
    V3,
    V4,
    V5,
}

impl Protocol {
    /// Parses a name from [`PROTOCOLS`].
    pub fn parse(name: &str) -> Result<Protocol> {
        Ok(match name {
            "channel.k8s.io" => Protocol::V1,
            "v2.channel.k8s.io" => Protocol::V2,
            "v3.channel.k8s.io" => Protocol::V3,
            "v4.channel.k8s.io" => Protocol::V4,
            "v5.channel.k8s.io" => Protocol::V5,
            other => return Err(Error::UnsupportedProtocol(other.to_string())),
        })
    }

    /// v3 added the `resize` stream.
    pub fn supports_resize(self) -> bool {
        self >= Protocol::V3
    }

    /// v4 made the error stream a JSON `metav1.Status` carrying the exit code.
    pub fn json_status(self) -> bool {
        self >= Protocol::V4
    }
}

/// What an exec or attach request asks for (its query parameters).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct ExecOptions {
    /// `command`, repeated: the argv (empty for attach).
    pub command: Vec<String>,
    /// `container`, if given.
    pub container: Option<String>,
    pub stdin: bool,
    pub stdout: bool,
    pub stderr: bool,
    pub tty: bool,
}

impl ExecOptions {
    /// Parses an exec query string (without `?`); a command is required.
    pub fn from_exec_query(query: &str) -> Result<ExecOptions> {
        let options = Self::parse(query)?;
        if options.command.is_empty() {
            return Err(Error::MissingCommand);
        }
        Ok(options)
    }

    /// Parses an attach query string (without `?`); `command` is ignored if present.
    pub fn from_attach_query(query: &str) -> Result<ExecOptions> {
        let mut options = Self::parse(query)?;
        options.command.clear();
        Ok(options)
    }

    fn parse(query: &str) -> Result<ExecOptions> {
        let mut o = ExecOptions::default();
        for (key, value) in parse_query(query) {
            match key.as_str() {
                "command" => o.command.push(value),
                "container" => o.container = Some(value),
                // The API server sends the kubelet `input`, `output` and `error` (corev1's
                // ExecStdinParam and friends); direct clients may use the pod-exec names.
                "input" | "stdin" => o.stdin = parse_bool("stdin", value)?,
                "output" | "stdout" => o.stdout = parse_bool("stdout", value)?,
                "error" | "stderr" => o.stderr = parse_bool("stderr", value)?,
                "tty" => o.tty = parse_bool("tty", value)?,
                _ => {}
            }
        }
        // A TTY merges stderr into stdout; the kubelet drops stderr the same way.
        if o.tty {
            o.stderr = false;
        }
        if !o.stdin && !o.stdout && !o.stderr {
            return Err(Error::NoStreamsRequested);
        }
        Ok(o)
    }
}

fn parse_bool(name: &'static str, value: String) -> Result<bool> {
    match value.to_ascii_lowercase().as_str() {
        "1" | "true" => Ok(true),
        "0" | "false" | "" => Ok(false),
        _ => Err(Error::InvalidOption {
            name,
            value,
            reason: "want 1, true, 0 or false",
        }),
    }
}

/// Splits an `application/x-www-form-urlencoded` query into decoded pairs.
pub fn parse_query(query: &str) -> Vec<(String, String)> {
    query
        .split('&')
        .filter(|p| !p.is_empty())
        .map(|pair| {
            let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
            (percent_decode(k), percent_decode(v))
        })
        .collect()
}

fn percent_decode(s: &str) -> String {
    let bytes = s.as_bytes();
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        match bytes[i] {
            b'+' => out.push(b' '),
            b'%' if i + 2 < bytes.len() => {
                let hex = std::str::from_utf8(&bytes[i + 1..i + 3])
                    .ok()
                    .and_then(|h| u8::from_str_radix(h, 16).ok());
                match hex {
                    Some(b) => {
                        out.push(b);
                        i += 2;
                    }
                    None => out.push(b'%'),
                }
            }
            b => out.push(b),
        }
        i += 1;
    }
    String::from_utf8_lossy(&out).into_owned()
}

/// A terminal size from the `resize` stream (`remotecommand.TerminalSize`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct TerminalSize {
    #[serde(rename = "Width")]
    pub width: u16,
    #[serde(rename = "Height")]
    pub height: u16,
}

/// The I/O of one exec/attach session, handed to the [`ExecHandler`]. Each stream is an
/// in-memory pipe: read `stdin` (EOF when the client closes it); write `stdout`/`stderr`, and
/// drop or shut them down when done (that sends FIN).
pub struct ExecIo {
    /// The argv (empty for attach).
    pub command: Vec<String>,
    /// The `container` parameter.
    pub container: Option<String>,
    /// Whether the client asked for a TTY.
    pub tty: bool,
    /// Read side for the client's stdin, if requested.
    pub stdin: Option<DuplexStream>,
    /// Write side for stdout, if requested.
    pub stdout: Option<DuplexStream>,
    /// Write side for stderr, if requested (never with a TTY).
    pub stderr: Option<DuplexStream>,
    /// Terminal resizes (v3 and later, TTY only). Safe to ignore or drop.
    pub resize: Option<mpsc::Receiver<TerminalSize>>,
}

/// Runs the command (or attaches). `Ok(code)` is the exit code; `Err` an internal failure,
/// reported to the client as an `InternalError` status.
pub trait ExecHandler: Send + Sync {
    fn exec(&self, io: ExecIo) -> impl Future<Output = std::result::Result<i32, String>> + Send;
}

/// The bytes to write to the error stream for an outcome, as the kubelet writes them: v4+
/// always a JSON `metav1.Status`; before v4 the message only on failure (`None` on success).
pub fn encode_status(
    protocol: Protocol,
    command: &[String],
    outcome: &std::result::Result<i32, String>,
) -> Option<Vec<u8>> {
    #[derive(Serialize)]
    struct Empty {}
    #[derive(Serialize)]
    struct Cause {
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
        message: String,
    }
    #[derive(Serialize)]
    struct Details {
        causes: Vec<Cause>,
    }
    #[derive(Serialize)]
    struct Status {
        metadata: Empty,
        status: &'static str,
        #[serde(skip_serializing_if = "Option::is_none")]
        message: Option<String>,
        #[serde(skip_serializing_if = "Option::is_none")]
        reason: Option<&'static str>,
        #[serde(skip_serializing_if = "Option::is_none")]
        details: Option<Details>,
        #[serde(skip_serializing_if = "Option::is_none")]
        code: Option<u16>,
    }
    let status = match outcome {
        Ok(0) => Status {
            metadata: Empty {},
            status: "Success",
            message: None,
            reason: None,
            details: None,
            code: None,
        },
        Ok(code) => Status {
            metadata: Empty {},
            status: "Failure",
            // "error executing command [argv], exit code N" is the runtime's (containerd's)
            // text; the prefix is the kubelet's.
            message: Some(format!(
                "command terminated with non-zero exit code: error executing command [{}], exit code {code}",
                command.join(" ")
            )),
            reason: Some("NonZeroExitCode"),
            details: Some(Details {
                causes: vec![Cause {
                    reason: Some("ExitCode"),
                    message: code.to_string(),
                }],
            }),
            code: None,
        },
        Err(e) => {
            // The kubelet's wording: an attach has no command.
            let err = if command.is_empty() { format!("error attaching to container: {e}") } else { format!("error executing command in container: {e}") };
            Status {
                metadata: Empty {},
                status: "Failure",
                message: Some(format!("Internal error occurred: {err}")),
                reason: Some("InternalError"),
                details: Some(Details {
                    causes: vec![Cause {
                        reason: None,
                        message: err,
                    }],
                }),
                code: Some(500),
            }
        }
    };
    if protocol.json_status() {
        serde_json::to_vec(&status).ok()
    } else {
        status.message.map(String::into_bytes)
    }
}

/// The streams of one session, by channel.
#[derive(Default)]
struct Channels {
    error: Option<SpdyStream>,
    stdin: Option<SpdyStream>,
    stdout: Option<SpdyStream>,
    stderr: Option<SpdyStream>,
    resize: Option<SpdyStream>,
}

async fn wait_for_streams(
    session: &mut Session,
    protocol: Protocol,
    expected: usize,
) -> Result<Channels> {
    let mut ch = Channels::default();
    let mut received = 0;
    while received < expected {
        let Some(incoming) = session.accept().await else {
            return Err(Error::SessionClosed);
        };
        let kind = incoming
            .headers()
            .get(STREAM_TYPE_HEADER)
            .unwrap_or("")
            .to_string();
        let slot = match kind.as_str() {
            STREAM_TYPE_ERROR => &mut ch.error,
            STREAM_TYPE_STDIN => &mut ch.stdin,
            STREAM_TYPE_STDOUT => &mut ch.stdout,
            STREAM_TYPE_STDERR => &mut ch.stderr,
            STREAM_TYPE_RESIZE if protocol.supports_resize() => &mut ch.resize,
            _ => {
                debug!(
                    stream = incoming.id(),
                    kind, "unexpected stream type; rejected"
                );
                incoming.reject(RST_CANCEL);
                continue;
            }
        };
        if slot.is_some() {
            debug!(
                stream = incoming.id(),
                kind, "duplicate stream type; rejected"
            );
            incoming.reject(RST_CANCEL);
            continue;
        }
        *slot = incoming.accept();
        received += 1;
    }
    Ok(ch)
}

/// Serves one exec/attach session on an upgraded connection: waits for the client's streams,
/// runs `handler`, writes the outcome to the error stream and closes the session (GOAWAY).
/// `protocol` is the name [`negotiate`](super::handshake::negotiate) chose from [`PROTOCOLS`].
pub async fn serve_remotecommand<IO, H>(
    io: IO,
    protocol: &str,
    options: ExecOptions,
    handler: &H,
    config: &StreamingConfig,
) -> Result<()>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: ExecHandler + ?Sized,
{
    let protocol = Protocol::parse(protocol)?;
    let mut session = Session::new(io, config.session.clone());
    let resize = options.tty && protocol.supports_resize();
    let expected = 1 + [options.stdin, options.stdout, options.stderr, resize]
        .iter()
        .filter(|b| **b)
        .count();
    let waited = tokio::time::timeout(
        config.stream_creation_timeout,
        wait_for_streams(&mut session, protocol, expected),
    )
    .await;
    let ch = match waited {
        Ok(Ok(ch)) => ch,
        Ok(Err(e)) => {
            // The session's own error (a protocol error, say) says more than "closed".
            session.close().await?;
            return Err(e);
        }
        Err(_) => {
            let _ = session.close().await;
            return Err(Error::StreamCreationTimeout);
        }
    };
    debug!(?protocol, expected, "all streams received; running handler");

    let mut output_done: Vec<JoinHandle<()>> = Vec::new();
    let stdin = ch.stdin.map(|s| s.into_io().0);
    let mut output = |s: Option<SpdyStream>| {
        s.map(|s| {
            let (io, done) = s.into_io();
            output_done.push(done);
            io
        })
    };
    let stdout = output(ch.stdout);
    let stderr = output(ch.stderr);
    let resize_rx = ch.resize.map(|stream| {
        let (tx, rx) = mpsc::channel(RESIZE_QUEUE);
        let sender = stream.sender();
        tokio::spawn(async move {
            let _ = sender.finish().await;
        });
        tokio::spawn(pump_resize(stream, tx));
        rx
    });
    let command = options.command.clone();
    let io = ExecIo {
        command: options.command,
        container: options.container,
        tty: options.tty,
        stdin,
        stdout,
        stderr,
        resize: resize_rx,
    };
    let outcome = handler.exec(io).await;
    debug!(?outcome, "handler finished");
    for done in output_done {
        if tokio::time::timeout(OUTPUT_DRAIN, done).await.is_err() {
            debug!("output still open after the handler returned; writing status anyway");
        }
    }
    if let Some(error) = ch.error {
        let sender = error.sender();
        if let Some(bytes) = encode_status(protocol, &command, &outcome) {
            if let Err(e) = sender.send(Bytes::from(bytes)).await {
                debug!(error = %e, "could not write the exit status");
            }
        }
        let _ = sender.finish().await;
    }
    session.close().await
}

/// Decodes the resize stream: concatenated JSON `TerminalSize` objects.
async fn pump_resize(mut stream: SpdyStream, tx: mpsc::Sender<TerminalSize>) {
    let mut buf: Vec<u8> = Vec::new();
    while let Some(chunk) = stream.recv().await {
        buf.extend_from_slice(&chunk);
        let mut consumed = 0;
        {
            let mut it = serde_json::Deserializer::from_slice(&buf).into_iter::<TerminalSize>();
            loop {
                match it.next() {
                    Some(Ok(size)) => {
                        consumed = it.byte_offset();
                        if tx.try_send(size).is_err() {
                            debug!(?size, "resize event dropped (handler not reading)");
                        }
                    }
                    Some(Err(e)) if e.is_eof() => break,
                    Some(Err(e)) => {
                        debug!(error = %e, "malformed resize event; ignoring the resize stream");
                        return;
                    }
                    None => {
                        consumed = it.byte_offset();
                        break;
                    }
                }
            }
        }
        buf.drain(..consumed);
        if buf.len() > MAX_RESIZE_BUFFER {
            debug!("resize stream sends no complete events; ignoring it");
            return;
        }
    }
}
