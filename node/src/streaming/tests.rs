//! End-to-end tests of the streaming server against a minimal SPDY client playing the
//! apiserver, over an in-memory duplex pipe.

use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream, ReadHalf, WriteHalf};

use super::portforward::{self, PortForwardHandler, PortForwardTarget};
use super::remotecommand::{self, encode_status, ExecHandler, ExecIo, ExecOptions, Protocol};
use super::spdy::*;
use super::{Error, StreamingConfig};

/// What the apiserver would do, frame by frame.
struct Client {
    rd: ReadHalf<DuplexStream>,
    wr: WriteHalf<DuplexStream>,
    hc: HeaderCompressor,
    hd: HeaderDecompressor,
    next_id: u32,
}

impl Client {
    fn new(io: DuplexStream) -> Client {
        let (rd, wr) = tokio::io::split(io);
        Client {
            rd,
            wr,
            hc: HeaderCompressor::new().unwrap(),
            hd: HeaderDecompressor::new(),
            next_id: 1,
        }
    }

    async fn send(&mut self, frame: Frame) {
        let bytes = encode_frame(&frame, &mut self.hc).unwrap();
        self.wr.write_all(&bytes).await.unwrap();
    }

    async fn open(&mut self, headers: Headers) -> u32 {
        let stream_id = self.next_id;
        self.next_id += 2;
        self.send(Frame::SynStream {
            stream_id,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers,
        })
        .await;
        stream_id
    }

    async fn data(&mut self, stream_id: u32, data: &[u8], fin: bool) {
        let flags = if fin { FLAG_FIN } else { 0 };
        self.send(Frame::Data {
            stream_id,
            flags,
            data: Bytes::copy_from_slice(data),
        })
        .await;
    }

    /// The next frame, `None` at end of input; fails the test after 10 s.
    async fn next(&mut self) -> Option<Frame> {
        tokio::time::timeout(
            Duration::from_secs(10),
            read_frame(&mut self.rd, &mut self.hd),
        )
        .await
        .expect("timed out waiting for a frame")
        .expect("server sent a malformed frame")
    }
}

/// Everything the server sent, by stream, until it closed the connection.
#[derive(Default, Debug)]
struct Transcript {
    replies: Vec<u32>,
    data: std::collections::HashMap<u32, Vec<u8>>,
    fins: Vec<u32>,
    window_updates: Vec<(u32, u32)>,
    goaway: Option<u32>,
}

async fn read_all(client: &mut Client) -> Transcript {
    let mut t = Transcript::default();
    while let Some(frame) = client.next().await {
        match frame {
            Frame::SynReply { stream_id, .. } => t.replies.push(stream_id),
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                t.data
                    .entry(stream_id)
                    .or_default()
                    .extend_from_slice(&data);
                if flags & FLAG_FIN != 0 {
                    t.fins.push(stream_id);
                }
            }
            Frame::WindowUpdate { stream_id, delta } => t.window_updates.push((stream_id, delta)),
            Frame::GoAway { status, .. } => t.goaway = Some(status),
            other => panic!("unexpected frame {other:?}"),
        }
    }
    t
}

fn stream(kind: &str) -> Headers {
    Headers::new().with("streamType", kind)
}

/// Echoes stdin to stdout, then exits with `code`.
struct Echo {
    code: i32,
}

impl ExecHandler for Echo {
    async fn exec(&self, mut io: ExecIo) -> Result<i32, String> {
        let mut input = Vec::new();
        if let Some(stdin) = io.stdin.as_mut() {
            stdin
                .read_to_end(&mut input)
                .await
                .map_err(|e| e.to_string())?;
        }
        if let Some(stdout) = io.stdout.as_mut() {
            stdout.write_all(&input).await.map_err(|e| e.to_string())?;
            stdout.shutdown().await.map_err(|e| e.to_string())?;
        }
        Ok(self.code)
    }
}

/// Writes `len` bytes to stdout.
struct Flood {
    len: usize,
}

impl ExecHandler for Flood {
    async fn exec(&self, mut io: ExecIo) -> Result<i32, String> {
        let stdout = io.stdout.as_mut().ok_or("no stdout")?;
        let chunk: Vec<u8> = (0..self.len).map(|i| (i % 251) as u8).collect();
        stdout.write_all(&chunk).await.map_err(|e| e.to_string())?;
        Ok(0)
    }
}

fn exec_options(query: &str) -> ExecOptions {
    ExecOptions::from_exec_query(query).unwrap()
}

async fn run_echo(code: i32, stdin: &[u8]) -> (Transcript, u32, u32, u32, Result<(), Error>) {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let options = exec_options("command=sh&command=-c&command=exit+3&stdin=1&stdout=1&stderr=0");
    let server = tokio::spawn(async move {
        let config = StreamingConfig::default();
        remotecommand::serve_remotecommand(
            server_io,
            "v4.channel.k8s.io",
            options,
            &Echo { code },
            &config,
        )
        .await
    });
    let mut client = Client::new(client_io);
    let error = client.open(stream("error")).await;
    let stdin_id = client.open(stream("stdin")).await;
    let stdout = client.open(stream("stdout")).await;
    for chunk in stdin.chunks(10_000) {
        client.data(stdin_id, chunk, false).await;
    }
    client.data(stdin_id, b"", true).await;
    let t = read_all(&mut client).await;
    drop(client);
    let result = server.await.unwrap();
    (t, error, stdin_id, stdout, result)
}

#[tokio::test]
async fn exec_echoes_stdin_and_reports_non_zero_exit_code() {
    let (t, error, stdin, stdout, result) = run_echo(3, b"hello from kubectl").await;
    result.unwrap();
    assert_eq!(t.replies, vec![error, stdin, stdout]);
    assert_eq!(t.data[&stdout], b"hello from kubectl");
    let status: serde_json::Value = serde_json::from_slice(&t.data[&error]).unwrap();
    assert_eq!(status["status"], "Failure");
    assert_eq!(status["reason"], "NonZeroExitCode");
    assert_eq!(status["details"]["causes"][0]["reason"], "ExitCode");
    assert_eq!(status["details"]["causes"][0]["message"], "3");
    assert!(t.fins.contains(&stdout) && t.fins.contains(&error), "{t:?}");
    assert_eq!(t.goaway, Some(GOAWAY_OK));
}

#[tokio::test]
async fn exec_exit_zero_is_success_and_stdin_is_credited() {
    // 100 KB of stdin: more than a window, so the server must credit it as it is read.
    let input: Vec<u8> = (0..100_000).map(|i| (i % 7) as u8 + b'a').collect();
    let (t, error, stdin, stdout, result) = run_echo(0, &input).await;
    result.unwrap();
    assert_eq!(t.data[&stdout], input);
    assert_eq!(t.data[&error], br#"{"metadata":{},"status":"Success"}"#);
    let stream_credit: u32 = t
        .window_updates
        .iter()
        .filter(|(id, _)| *id == stdin)
        .map(|(_, d)| d)
        .sum();
    let session_credit: u32 = t
        .window_updates
        .iter()
        .filter(|(id, _)| *id == 0)
        .map(|(_, d)| d)
        .sum();
    assert!(stream_credit >= 64 * 1024, "stdin credited {stream_credit}");
    assert!(
        session_credit >= 64 * 1024,
        "session credited {session_credit}"
    );
}

#[test]
fn status_text_matches_the_kubelet() {
    let argv = vec!["sh".to_string(), "-c".to_string(), "exit 3".to_string()];
    let failure = encode_status(Protocol::V4, &argv, &Ok(3)).unwrap();
    assert_eq!(
        String::from_utf8(failure).unwrap(),
        r#"{"metadata":{},"status":"Failure","message":"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 3","reason":"NonZeroExitCode","details":{"causes":[{"reason":"ExitCode","message":"3"}]}}"#
    );
    assert_eq!(
        encode_status(Protocol::V4, &argv, &Ok(0)).unwrap(),
        br#"{"metadata":{},"status":"Success"}"#
    );
    let internal =
        String::from_utf8(encode_status(Protocol::V5, &argv, &Err("boom".into())).unwrap())
            .unwrap();
    assert!(
        internal.contains(r#""reason":"InternalError""#) && internal.ends_with(r#""code":500}"#),
        "{internal}"
    );
    let attach =
        String::from_utf8(encode_status(Protocol::V4, &[], &Err("no stdin".into())).unwrap())
            .unwrap();
    assert!(
        attach.contains("Internal error occurred: error attaching to container: no stdin"),
        "{attach}"
    );
    // Before v4: nothing on success, the bare message on failure.
    assert_eq!(encode_status(Protocol::V3, &argv, &Ok(0)), None);
    assert_eq!(
        encode_status(Protocol::V2, &argv, &Ok(2)).unwrap(),
        b"command terminated with non-zero exit code: error executing command [sh -c exit 3], exit code 2"
    );
}

#[test]
fn exec_query_parsing() {
    let o = exec_options(
        "command=ls&command=-l%20%2Ftmp&container=app&stdin=true&stdout=1&stderr=1&tty=1",
    );
    assert_eq!(o.command, vec!["ls", "-l /tmp"]);
    assert_eq!(o.container.as_deref(), Some("app"));
    // A TTY has no separate stderr.
    assert!(o.stdin && o.stdout && !o.stderr && o.tty);
    assert!(matches!(
        ExecOptions::from_exec_query("stdout=1"),
        Err(Error::MissingCommand)
    ));
    assert!(matches!(
        ExecOptions::from_exec_query("command=ls"),
        Err(Error::NoStreamsRequested)
    ));
    let err = ExecOptions::from_exec_query("command=ls&stdout=yes").unwrap_err();
    assert!(
        matches!(err, Error::InvalidOption { name: "stdout", .. }),
        "{err}"
    );
    assert_eq!(err.http_status(), Some(400));
    let attach = ExecOptions::from_attach_query("stdout=1&tty=0").unwrap();
    assert!(attach.command.is_empty() && attach.stdout && !attach.tty);
}

/// Runs [`Flood`] and reads stdout as `credit` says; returns the bytes and the transcript.
async fn flood(flow_control: FlowControl, len: usize, client_does_flow_control: bool) -> Vec<u8> {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let mut config = StreamingConfig::default();
        config.session.flow_control = flow_control;
        let options = exec_options("command=cat&stdout=1");
        remotecommand::serve_remotecommand(
            server_io,
            "v4.channel.k8s.io",
            options,
            &Flood { len },
            &config,
        )
        .await
    });
    let mut client = Client::new(client_io);
    if client_does_flow_control {
        let settings = vec![Setting {
            flags: 0,
            id: SETTINGS_INITIAL_WINDOW_SIZE,
            value: DEFAULT_INITIAL_WINDOW,
        }];
        client.send(Frame::Settings { flags: 0, settings }).await;
    }
    let error = client.open(stream("error")).await;
    let stdout = client.open(stream("stdout")).await;
    let mut out = Vec::new();
    let mut status = Vec::new();
    let (mut stream_window, mut session_window) = (
        i64::from(DEFAULT_INITIAL_WINDOW),
        i64::from(DEFAULT_INITIAL_WINDOW),
    );
    let mut stalls = 0;
    loop {
        let frame = if client_does_flow_control && (stream_window == 0 || session_window == 0) {
            // The server must wait for credit now: nothing may arrive.
            match tokio::time::timeout(
                Duration::from_millis(200),
                read_frame(&mut client.rd, &mut client.hd),
            )
            .await
            {
                Err(_) => {
                    stalls += 1;
                    let consumed = i64::from(DEFAULT_INITIAL_WINDOW) - stream_window;
                    client
                        .send(Frame::WindowUpdate {
                            stream_id: stdout,
                            delta: consumed as u32,
                        })
                        .await;
                    client
                        .send(Frame::WindowUpdate {
                            stream_id: 0,
                            delta: consumed as u32,
                        })
                        .await;
                    stream_window += consumed;
                    session_window += consumed;
                    continue;
                }
                Ok(frame) => frame.unwrap(),
            }
        } else {
            client.next().await
        };
        match frame {
            None => break,
            Some(Frame::Data {
                stream_id, data, ..
            }) if stream_id == stdout => {
                stream_window -= data.len() as i64;
                session_window -= data.len() as i64;
                if client_does_flow_control {
                    assert!(
                        stream_window >= 0 && session_window >= 0,
                        "server overran the window"
                    );
                }
                out.extend_from_slice(&data);
            }
            Some(Frame::Data {
                stream_id, data, ..
            }) if stream_id == error => status.extend_from_slice(&data),
            Some(_) => {}
        }
    }
    server.await.unwrap().unwrap();
    assert_eq!(status, br#"{"metadata":{},"status":"Success"}"#);
    if client_does_flow_control {
        assert!(
            stalls >= len / DEFAULT_INITIAL_WINDOW as usize,
            "server never waited for credit ({stalls} stalls)"
        );
    }
    out
}

#[tokio::test]
async fn flow_control_waits_for_window_updates() {
    let len = 200 * 1024;
    let out = flood(FlowControl::Auto, len, true).await;
    assert_eq!(out.len(), len);
    assert!(out.iter().enumerate().all(|(i, b)| *b == (i % 251) as u8));
}

#[tokio::test]
async fn peer_without_flow_control_still_gets_everything() {
    // moby/spdystream never sends WINDOW_UPDATE: Auto must not stall at 64 KiB.
    let len = 200 * 1024;
    assert_eq!(flood(FlowControl::Auto, len, false).await.len(), len);
}

#[tokio::test]
async fn malformed_frame_ends_session_with_goaway() {
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let options = exec_options("command=true&stdout=1");
        remotecommand::serve_remotecommand(
            server_io,
            "v4.channel.k8s.io",
            options,
            &Echo { code: 0 },
            &StreamingConfig::default(),
        )
        .await
    });
    let mut client = Client::new(client_io);
    // A SYN_STREAM whose header block is not zlib at all.
    let garbage: &[u8] = &[
        0x80, 0x03, 0x00, 0x01, 0x00, 0x00, 0x00, 0x0e, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0xde, 0xad,
        0xbe, 0xef,
    ];
    client.wr.write_all(garbage).await.unwrap();
    let t = read_all(&mut client).await;
    assert_eq!(t.goaway, Some(GOAWAY_PROTOCOL_ERROR));
    let err = server.await.unwrap().unwrap_err();
    assert!(
        matches!(err, Error::Compression(_) | Error::Protocol(_)),
        "{err}"
    );
}

#[tokio::test]
async fn truncated_and_bad_frames_do_not_panic() {
    let cases: Vec<Vec<u8>> = vec![
        vec![0x80, 0x02, 0x00, 0x06, 0, 0, 0, 4, 0, 0, 0, 1], // SPDY/2 PING
        vec![0x80, 0x03, 0x00, 0x03, 0, 0, 0, 2, 0, 0],       // short RST_STREAM
        vec![0x80, 0x03, 0x00, 0x04, 0, 0, 0, 4, 0xff, 0xff, 0xff, 0xff], // SETTINGS lying about its count
        vec![0x00, 0x00, 0x00, 0x00, 0, 0, 0, 1, 0],                      // DATA on stream 0
        vec![0x80, 0x03, 0x00, 0x09, 0, 0, 0, 8, 0, 0, 0, 1, 0, 0, 0, 0], // WINDOW_UPDATE delta 0
        vec![0x80, 0x03, 0x00, 0x01, 0, 0, 0, 20, 0, 0],                  // cut inside a frame
    ];
    for bytes in cases {
        let (server_io, mut client_io) = tokio::io::duplex(1 << 16);
        let mut session = Session::new(server_io, SessionConfig::default());
        client_io.write_all(&bytes).await.unwrap();
        client_io.shutdown().await.unwrap();
        assert!(session.accept().await.is_none());
        let err = session.close().await.unwrap_err();
        assert!(matches!(err, Error::Protocol(_)), "{bytes:?}: {err}");
        let mut rest = Vec::new();
        client_io.read_to_end(&mut rest).await.unwrap();
        let frame = read_frame(&mut rest.as_slice(), &mut HeaderDecompressor::new())
            .await
            .unwrap();
        assert_eq!(
            frame,
            Some(Frame::GoAway {
                last_good_stream_id: 0,
                status: GOAWAY_PROTOCOL_ERROR
            }),
            "{bytes:?}"
        );
    }
}

#[tokio::test]
async fn ping_is_echoed() {
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let _session = Session::new(server_io, SessionConfig::default());
    let mut client = Client::new(client_io);
    client.send(Frame::Ping { id: 7 }).await;
    assert_eq!(client.next().await, Some(Frame::Ping { id: 7 }));
}

#[tokio::test]
async fn chromium_compressed_syn_reply_vector_decodes() {
    // Chromium net/spdy/spdy_framer_test.cc, CreateSynReplyCompressed (SPDY/3): SYN_REPLY on
    // stream 1 with headers bar: foo, foo: bar, compressed with the SPDY/3 dictionary.
    let frame: &[u8] = &[
        0x80, 0x03, 0x00, 0x02, 0x00, 0x00, 0x00, 0x31, 0x00, 0x00, 0x00, 0x01, 0x38, 0xea, 0xe3,
        0xc6, 0xa7, 0xc2, 0x02, 0xe5, 0x0e, 0x50, 0xc2, 0x4b, 0x4a, 0x04, 0xe5, 0x0b, 0x66, 0x80,
        0x00, 0x4a, 0xcb, 0xcf, 0x07, 0x08, 0x20, 0x10, 0x95, 0x96, 0x9f, 0x0f, 0xa2, 0x00, 0x02,
        0x28, 0x29, 0xb1, 0x08, 0x20, 0x80, 0x00, 0x00, 0x00, 0x00, 0xff, 0xff,
    ];
    let mut hd = HeaderDecompressor::new();
    let decoded = read_frame(&mut &frame[..], &mut hd).await.unwrap().unwrap();
    let Frame::SynReply {
        stream_id: 1,
        flags: 0,
        headers,
    } = decoded
    else {
        panic!("{decoded:?}")
    };
    assert_eq!(headers.get("bar"), Some("foo"));
    assert_eq!(headers.get("foo"), Some("bar"));
    assert_eq!(headers.len(), 2);
    // The zlib header names the dictionary by its Adler-32: 0xe3c6a7c2.
    assert_eq!(HEADER_DICTIONARY.len(), 1423);
}

#[tokio::test]
async fn header_context_persists_across_blocks() {
    let mut hc = HeaderCompressor::new().unwrap();
    let mut hd = HeaderDecompressor::new();
    for i in 0..20 {
        let h = Headers::new()
            .with("streamType", "stdout")
            .with("requestID", &i.to_string())
            .with("port", "8080");
        let frame = Frame::SynStream {
            stream_id: 2 * i + 1,
            associated_to: 0,
            priority: 0,
            flags: 0,
            headers: h.clone(),
        };
        let bytes = encode_frame(&frame, &mut hc).unwrap();
        assert_eq!(
            read_frame(&mut bytes.as_slice(), &mut hd).await.unwrap(),
            Some(frame)
        );
    }
}

/// Echoes the forwarded bytes back, or fails for port 81.
struct EchoPort;

impl PortForwardHandler for EchoPort {
    async fn forward(&self, port: u16, stream: DuplexStream) -> std::io::Result<()> {
        if port == 81 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::ConnectionRefused,
                "connection refused",
            ));
        }
        let (mut rd, mut wr) = tokio::io::split(stream);
        tokio::io::copy(&mut rd, &mut wr).await?;
        wr.shutdown().await
    }
}

fn pf(kind: &str, port: &str, request: &str) -> Headers {
    Headers::new()
        .with("streamType", kind)
        .with("port", port)
        .with("requestID", request)
}

#[tokio::test]
async fn port_forward_pairs_by_request_id_and_echoes() {
    let (server_io, client_io) = tokio::io::duplex(1 << 20);
    let server = tokio::spawn(async move {
        let target = PortForwardTarget {
            pod: "web".into(),
            uid: "u-1".into(),
        };
        portforward::serve_portforward(
            server_io,
            target,
            Arc::new(EchoPort),
            &StreamingConfig::default(),
        )
        .await
    });
    let mut client = Client::new(client_io);
    // Two connections, interleaved: pairing must go by requestID, not by order.
    let err_a = client.open(pf("error", "80", "0")).await;
    let err_b = client.open(pf("error", "81", "1")).await;
    let data_a = client.open(pf("data", "80", "0")).await;
    let data_b = client.open(pf("data", "81", "1")).await;
    let bad = client.open(pf("data", "0", "2")).await;
    client.data(data_a, b"GET / HTTP/1.0\r\n\r\n", true).await;
    let mut t = Transcript::default();
    let mut reset = Vec::new();
    while !(t.fins.contains(&data_a) && t.fins.contains(&err_a) && t.fins.contains(&err_b)) {
        match client.next().await.expect("connection closed early") {
            Frame::SynReply { stream_id, .. } => t.replies.push(stream_id),
            Frame::Data {
                stream_id,
                flags,
                data,
            } => {
                t.data
                    .entry(stream_id)
                    .or_default()
                    .extend_from_slice(&data);
                if flags & FLAG_FIN != 0 {
                    t.fins.push(stream_id);
                }
            }
            Frame::RstStream { stream_id, status } => reset.push((stream_id, status)),
            Frame::WindowUpdate { .. } => {}
            other => panic!("unexpected {other:?}"),
        }
    }
    assert_eq!(t.data[&data_a], b"GET / HTTP/1.0\r\n\r\n");
    assert!(t.data.get(&err_a).is_none_or(|d| d.is_empty()));
    let failure: serde_json::Value = serde_json::from_slice(&t.data[&err_b]).unwrap();
    assert_eq!(failure["closeConnection"], true);
    assert_eq!(
        failure["message"],
        "error forwarding port 81 to pod web, uid u-1: connection refused"
    );
    assert_eq!(reset, vec![(bad, RST_CANCEL)]);
    let _ = data_b;
    // The client hangs up: the server finishes cleanly.
    drop(client);
    tokio::time::timeout(Duration::from_secs(10), server)
        .await
        .unwrap()
        .unwrap()
        .unwrap();
}

#[tokio::test(start_paused = true)]
async fn streams_that_never_arrive_time_out() {
    let (server_io, client_io) = tokio::io::duplex(1 << 16);
    let server = tokio::spawn(async move {
        let options = exec_options("command=true&stdin=1&stdout=1");
        remotecommand::serve_remotecommand(
            server_io,
            "v4.channel.k8s.io",
            options,
            &Echo { code: 0 },
            &StreamingConfig::default(),
        )
        .await
    });
    let mut client = Client::new(client_io);
    client.open(stream("error")).await;
    let err = server.await.unwrap().unwrap_err();
    assert!(matches!(err, Error::StreamCreationTimeout), "{err}");
}
