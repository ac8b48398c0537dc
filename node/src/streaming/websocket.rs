//! `exec` and `attach` over WebSocket, for clients that talk to the kubelet directly (the API
//! server itself speaks SPDY to us): the channel protocols `v5.channel.k8s.io`,
//! `v4.channel.k8s.io` and their base64 forms `v4.base64.channel.k8s.io` and
//! `base64.channel.k8s.io` of k8s.io/apimachinery's wsstream.
//!
//! Framing: every binary message starts with a channel byte, 0 stdin, 1 stdout, 2 stderr,
//! 3 error (the final `metav1.Status`, JSON in all of them), 4 resize (JSON
//! `TerminalSize`). v5 adds the close signal `[255, channel]` (the client has no more stdin).
//! The base64 forms send text messages instead: the channel as an ASCII digit, then the data
//! in standard base64 (for clients, like browsers, that handle text more easily).
//! As wsstream does, the server first writes an empty message on the lowest channel it writes
//! to, so the client knows the streams are open; after the handler returns it writes the status
//! on the error channel and closes the connection normally.
//!
//! Start at [`negotiate`] (before the 101 answer) and [`serve_remotecommand`].

use bytes::{BufMut, Bytes, BytesMut};
use futures::{SinkExt, StreamExt};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::mpsc;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role};
use tokio_tungstenite::tungstenite::Message;
use tokio_tungstenite::WebSocketStream;
use tracing::debug;

use super::remotecommand::{
    encode_status, ExecHandler, ExecIo, ExecOptions, Protocol, TerminalSize,
};

/// The channel protocols served, in order of preference.
pub const PROTOCOLS: &[&str] = &[
    "v5.channel.k8s.io",
    "v4.channel.k8s.io",
    "v4.base64.channel.k8s.io",
    "base64.channel.k8s.io",
];

/// How a channel's data is put in a message.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Framing {
    /// A binary message: the channel byte, then the data.
    Binary,
    /// A text message: the channel as an ASCII digit, then the data in base64.
    Base64,
}

impl Framing {
    fn of(protocol: &str) -> Framing {
        if protocol.contains("base64") {
            Framing::Base64
        } else {
            Framing::Binary
        }
    }

    fn encode(self, channel: u8, data: &[u8]) -> Message {
        match self {
            Framing::Binary => {
                let mut message = BytesMut::with_capacity(1 + data.len());
                message.put_u8(channel);
                message.put_slice(data);
                Message::Binary(message.freeze())
            }
            Framing::Base64 => {
                use base64::Engine;
                let mut text = String::with_capacity(1 + data.len() * 4 / 3 + 4);
                text.push(char::from(b'0' + channel));
                base64::engine::general_purpose::STANDARD.encode_string(data, &mut text);
                Message::text(text)
            }
        }
    }

    /// The channel and data of a client's message; `None` for what carries none (pings, a
    /// malformed frame).
    fn decode(self, message: Message) -> Option<(u8, Bytes)> {
        match (self, message) {
            (Framing::Binary, Message::Binary(data)) => Some((*data.first()?, data.slice(1..))),
            (Framing::Base64, Message::Text(text)) => {
                use base64::Engine;
                let text = text.as_str();
                let channel = text
                    .bytes()
                    .next()?
                    .checked_sub(b'0')
                    .filter(|c| *c <= RESIZE)?;
                let data = base64::engine::general_purpose::STANDARD
                    .decode(&text[1..])
                    .ok()?;
                Some((channel, Bytes::from(data)))
            }
            _ => None,
        }
    }
}

const STDIN: u8 = 0;
const STDOUT: u8 = 1;
const STDERR: u8 = 2;
const ERROR: u8 = 3;
const RESIZE: u8 = 4;
/// v5: `[CLOSE, channel]` half-closes a channel.
const CLOSE: u8 = 255;

/// In-memory pipe size between the connection and the handler per stream: a pipe buffer.
const PIPE: usize = 64 * 1024;
/// How long the handler's last output may take to reach the connection before the status is
/// written anyway (a handler that leaked its stdout must not hang the session).
const OUTPUT_DRAIN: std::time::Duration = std::time::Duration::from_secs(10);

/// Largest message (and frame) read from a client. Its messages are stdin chunks and resize
/// events: kubectl and client-go send stdin in 32 KiB reads; 1 MiB is 32 times that, where
/// tungstenite's defaults (64 MiB messages, 16 MiB frames) would let each session make the
/// agent buffer 64 MiB. A larger message ends the session with a protocol error.
pub const MAX_MESSAGE: usize = 1024 * 1024;
/// Bytes queued for writing before a send waits (tungstenite's default has no bound): the
/// writer task sends one message at a time, each at most a 32 KiB output chunk.
const MAX_WRITE_BUFFER: usize = 4 * 1024 * 1024;

/// The WebSocket settings of a session (see [`MAX_MESSAGE`]).
fn websocket_config() -> tokio_tungstenite::tungstenite::protocol::WebSocketConfig {
    tokio_tungstenite::tungstenite::protocol::WebSocketConfig::default()
        .max_message_size(Some(MAX_MESSAGE))
        .max_frame_size(Some(MAX_MESSAGE))
        .max_write_buffer_size(MAX_WRITE_BUFFER)
}

/// Whether a request asks for a WebSocket upgrade.
pub fn is_websocket(headers: &http::HeaderMap) -> bool {
    let has = |name: http::header::HeaderName, token: &str| {
        headers
            .get_all(name)
            .iter()
            .filter_map(|v| v.to_str().ok())
            .flat_map(|v| v.split(','))
            .any(|t| t.trim().eq_ignore_ascii_case(token))
    };
    has(http::header::UPGRADE, "websocket") && has(http::header::CONNECTION, "upgrade")
}

/// Why a WebSocket request cannot be upgraded: answered with 400.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum NegotiationError {
    #[error("a WebSocket upgrade needs Sec-WebSocket-Key")]
    MissingKey,
    #[error("none of the requested WebSocket subprotocols [{requested}] is supported; supported: {}", PROTOCOLS.join(", "))]
    NoCommonProtocol { requested: String },
}

/// Picks the subprotocol and builds the 101 answer's headers.
pub fn negotiate(
    headers: &http::HeaderMap,
) -> Result<(&'static str, http::HeaderMap), NegotiationError> {
    let key = headers
        .get(http::header::SEC_WEBSOCKET_KEY)
        .ok_or(NegotiationError::MissingKey)?;
    let requested = super::handshake::listed_tokens(headers, http::header::SEC_WEBSOCKET_PROTOCOL);
    let protocol = PROTOCOLS
        .iter()
        .find(|p| requested.iter().any(|r| r == *p))
        .copied()
        .ok_or_else(|| NegotiationError::NoCommonProtocol {
            requested: requested.join(", "),
        })?;
    let mut out = http::HeaderMap::new();
    out.insert(
        http::header::UPGRADE,
        http::HeaderValue::from_static("websocket"),
    );
    out.insert(
        http::header::CONNECTION,
        http::HeaderValue::from_static("Upgrade"),
    );
    let accept = tokio_tungstenite::tungstenite::handshake::derive_accept_key(key.as_bytes());
    out.insert(
        http::header::SEC_WEBSOCKET_ACCEPT,
        http::HeaderValue::from_str(&accept).map_err(|_| NegotiationError::MissingKey)?,
    );
    out.insert(
        http::header::SEC_WEBSOCKET_PROTOCOL,
        http::HeaderValue::from_static(protocol),
    );
    Ok((protocol, out))
}

/// Serves one exec/attach session on an upgraded WebSocket connection (see the module docs).
pub async fn serve_remotecommand<IO, H>(
    io: IO,
    protocol: &str,
    options: ExecOptions,
    handler: &H,
) -> Result<(), tokio_tungstenite::tungstenite::Error>
where
    IO: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
    H: ExecHandler + ?Sized,
{
    let v5 = protocol == "v5.channel.k8s.io";
    let framing = Framing::of(protocol);
    let ws = WebSocketStream::from_raw_socket(io, Role::Server, Some(websocket_config())).await;
    let (mut sink, mut stream) = ws.split();

    // One writer of the connection: everything to send goes through `out`.
    let (out, mut out_rx) = mpsc::channel::<Message>(64);
    let writer = tokio::spawn(async move {
        while let Some(message) = out_rx.recv().await {
            let closing = matches!(message, Message::Close(_));
            if sink.send(message).await.is_err() || closing {
                break;
            }
        }
        let _ = sink.close().await;
    });

    let pipe = |wanted: bool| wanted.then(|| tokio::io::duplex(PIPE));
    let (stdin_ours, stdin_theirs) = pipe(options.stdin).unzip();
    let (stdout_ours, stdout_theirs) = pipe(options.stdout).unzip();
    let (stderr_ours, stderr_theirs) = pipe(options.stderr).unzip();
    let (resize_tx, resize_rx) = if options.tty {
        let (tx, rx) = mpsc::channel(16);
        (Some(tx), Some(rx))
    } else {
        (None, None)
    };

    // Ready: an empty message on the lowest channel we write to.
    let first = if options.stdout {
        STDOUT
    } else if options.stderr {
        STDERR
    } else {
        ERROR
    };
    let _ = out.send(framing.encode(first, &[])).await;

    let mut pumps = Vec::new();
    for (channel, ours) in [(STDOUT, stdout_ours), (STDERR, stderr_ours)] {
        if let Some(ours) = ours {
            pumps.push(tokio::spawn(pump_output(
                framing,
                channel,
                ours,
                out.clone(),
            )));
        }
    }
    let reader = tokio::spawn(async move {
        let mut stdin = stdin_ours;
        while let Some(message) = stream.next().await {
            let (channel, data) = match message {
                Ok(Message::Close(_)) | Err(_) => break,
                Ok(message) => match framing.decode(message) {
                    Some(framed) => framed,
                    None => continue,
                },
            };
            match channel {
                STDIN => {
                    if let Some(pipe) = stdin.as_mut() {
                        if pipe.write_all(&data).await.is_err() {
                            stdin = None;
                        }
                    }
                }
                RESIZE => {
                    if let (Some(tx), Ok(size)) =
                        (&resize_tx, serde_json::from_slice::<TerminalSize>(&data))
                    {
                        let _ = tx.try_send(size);
                    }
                }
                CLOSE if v5 && data.first() == Some(&STDIN) => stdin = None,
                _ => debug!(channel, "unexpected WebSocket message; ignored"),
            }
        }
        // The client is gone (or closed): end of stdin.
        drop(stdin);
    });

    let command = options.command.clone();
    let exec_io = ExecIo {
        command: options.command,
        container: options.container,
        tty: options.tty,
        stdin: stdin_theirs,
        stdout: stdout_theirs,
        stderr: stderr_theirs,
        resize: resize_rx,
    };
    let outcome = handler.exec(exec_io).await;
    debug!(?outcome, "handler finished");
    for pump in pumps {
        if tokio::time::timeout(OUTPUT_DRAIN, pump).await.is_err() {
            debug!("output still open after the handler returned; writing status anyway");
        }
    }
    if let Some(status) = encode_status(Protocol::V4, &command, &outcome) {
        let _ = out.send(framing.encode(ERROR, &status)).await;
    }
    let _ = out
        .send(Message::Close(Some(CloseFrame {
            code: tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode::Normal,
            reason: "".into(),
        })))
        .await;
    drop(out);
    let _ = writer.await;
    reader.abort();
    Ok(())
}

/// Copies one of the handler's output pipes to the connection, framed on `channel`.
async fn pump_output(
    framing: Framing,
    channel: u8,
    mut pipe: DuplexStream,
    out: mpsc::Sender<Message>,
) {
    let mut buf = vec![0u8; 32 * 1024];
    loop {
        let n = match pipe.read(&mut buf).await {
            Ok(0) | Err(_) => return,
            Ok(n) => n,
        };
        if out.send(framing.encode(channel, &buf[..n])).await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn headers(pairs: &[(&str, &str)]) -> http::HeaderMap {
        pairs
            .iter()
            .map(|(k, v)| {
                (
                    http::header::HeaderName::from_bytes(k.as_bytes()).unwrap(),
                    http::HeaderValue::from_str(v).unwrap(),
                )
            })
            .collect()
    }

    #[test]
    fn base64_framing_round_trips_and_binary_keeps_the_channel_byte() {
        let text = Framing::Base64.encode(STDOUT, b"hi there");
        assert_eq!(text, Message::text("1aGkgdGhlcmU="));
        assert_eq!(
            Framing::Base64.decode(Message::text("0aGkgdGhlcmU=")),
            Some((STDIN, Bytes::from_static(b"hi there")))
        );
        assert_eq!(Framing::Base64.decode(Message::text("0not base64!")), None);
        assert_eq!(
            Framing::Base64.decode(Message::text("9aGk=")),
            None,
            "no such channel"
        );
        assert_eq!(
            Framing::Binary.encode(STDERR, b"x"),
            Message::Binary(Bytes::from_static(b"\x02x"))
        );
        assert_eq!(
            Framing::Binary.decode(Message::Binary(Bytes::from_static(b"\x00in"))),
            Some((STDIN, Bytes::from_static(b"in")))
        );
        assert_eq!(Framing::Binary.decode(Message::Binary(Bytes::new())), None);
        assert_eq!(Framing::of("v4.base64.channel.k8s.io"), Framing::Base64);
    }

    #[test]
    fn upgrade_requests_are_recognised() {
        assert!(is_websocket(&headers(&[
            ("upgrade", "websocket"),
            ("connection", "keep-alive, Upgrade")
        ])));
        assert!(!is_websocket(&headers(&[
            ("upgrade", "SPDY/3.1"),
            ("connection", "Upgrade")
        ])));
    }

    #[test]
    fn negotiation_prefers_v5_and_computes_the_accept_key() {
        let (protocol, out) = negotiate(&headers(&[
            ("sec-websocket-key", "dGhlIHNhbXBsZSBub25jZQ=="),
            (
                "sec-websocket-protocol",
                "v4.channel.k8s.io, v5.channel.k8s.io",
            ),
        ]))
        .unwrap();
        assert_eq!(protocol, "v5.channel.k8s.io");
        // RFC 6455's example.
        assert_eq!(
            out[http::header::SEC_WEBSOCKET_ACCEPT],
            "s3pPLMBiTxaQ9kYGzzhZRbK+xOo="
        );
        let err = negotiate(&headers(&[
            ("sec-websocket-key", "x"),
            ("sec-websocket-protocol", "channel.k8s.io"),
        ]))
        .unwrap_err();
        assert!(err.to_string().contains("v5.channel.k8s.io"), "{err}");
        assert_eq!(
            negotiate(&headers(&[("sec-websocket-protocol", "v5.channel.k8s.io")])).unwrap_err(),
            NegotiationError::MissingKey
        );
    }
}

/// The WebSocket side against arbitrary input: messages of any shape decode to a channel and
/// data or to nothing, never a panic; what the server encodes, a client's decoder reads back;
/// and raw bytes on the connection end the session without a panic or unbounded buffering.
#[cfg(test)]
mod proptests {
    use super::*;
    use proptest::prelude::*;

    fn arb_message() -> impl Strategy<Value = Message> {
        prop_oneof![
            prop::collection::vec(any::<u8>(), 0..64).prop_map(|b| Message::Binary(b.into())),
            "\\PC{0,64}".prop_map(Message::text),
            "[0-9][A-Za-z0-9+/=]{0,40}".prop_map(Message::text),
            prop::collection::vec(any::<u8>(), 0..16).prop_map(|b| Message::Ping(b.into())),
        ]
    }

    proptest! {
        #[test]
        fn client_messages_never_panic(message in arb_message()) {
            let _ = Framing::Binary.decode(message.clone());
            let _ = Framing::Base64.decode(message);
        }

        #[test]
        fn channel_messages_round_trip(channel in 0u8..=RESIZE, data in prop::collection::vec(any::<u8>(), 0..256)) {
            for framing in [Framing::Binary, Framing::Base64] {
                let decoded = framing.decode(framing.encode(channel, &data));
                prop_assert_eq!(decoded, Some((channel, Bytes::from(data.clone()))));
            }
        }
    }

    /// Raw bytes after the upgrade (frames of any shape, sizes that lie): the session ends,
    /// and a frame claiming more than [`MAX_MESSAGE`] is refused rather than buffered.
    #[test]
    fn raw_bytes_end_the_session() {
        struct Nothing;
        impl ExecHandler for Nothing {
            async fn exec(&self, io: ExecIo) -> Result<i32, String> {
                if let Some(mut stdin) = io.stdin {
                    let mut sink = Vec::new();
                    let _ = stdin.read_to_end(&mut sink).await;
                }
                Ok(0)
            }
        }
        let runtime = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .unwrap();
        let mut runner = proptest::test_runner::TestRunner::default();
        // One masked binary frame of 2 MiB (over MAX_MESSAGE, under tungstenite's defaults),
        // on stdin, and then nothing: refused, the session ends; taken, it would wait for more.
        let big = {
            let mut f = vec![0x82, 0xff];
            f.extend_from_slice(&(2u64 << 20).to_be_bytes());
            f.extend_from_slice(&[0, 0, 0, 0]);
            f.extend(std::iter::repeat_n(0u8, 2 << 20));
            f
        };
        runtime.block_on(async {
            let (server, client) = tokio::io::duplex(64 * 1024);
            let options = ExecOptions {
                stdin: true,
                stdout: true,
                ..ExecOptions::default()
            };
            let serving = tokio::spawn(async move {
                serve_remotecommand(server, "v5.channel.k8s.io", options, &Nothing).await
            });
            let (mut read, mut write) = tokio::io::split(client);
            tokio::spawn(async move {
                use tokio::io::AsyncWriteExt as _;
                let _ = write.write_all(&big).await;
                // Hold the connection open: only the server may end this session.
                std::future::pending::<()>().await;
            });
            let mut out = Vec::new();
            let ended = tokio::time::timeout(
                std::time::Duration::from_secs(10),
                read.read_to_end(&mut out),
            )
            .await;
            assert!(
                ended.is_ok(),
                "a message over {MAX_MESSAGE} bytes ends the session"
            );
            let _ = serving.await;
        });
        runner
            .run(&prop::collection::vec(any::<u8>(), 0..512), |bytes| {
                runtime.block_on(async {
                    let (server, mut client) = tokio::io::duplex(64 * 1024);
                    let options = ExecOptions {
                        stdin: true,
                        stdout: true,
                        ..ExecOptions::default()
                    };
                    let serving = tokio::spawn(async move {
                        serve_remotecommand(server, "v4.channel.k8s.io", options, &Nothing).await
                    });
                    use tokio::io::AsyncWriteExt as _;
                    let _ = client.write_all(&bytes).await;
                    let _ = client.shutdown().await;
                    let mut out = Vec::new();
                    let ended = tokio::time::timeout(
                        std::time::Duration::from_secs(10),
                        client.read_to_end(&mut out),
                    )
                    .await;
                    prop_assert!(
                        ended.is_ok(),
                        "the session ends once the client's input does"
                    );
                    let _ = serving.await;
                    Ok(())
                })
            })
            .unwrap();
    }
}
