//! The runtime side: [`serve`] answers the agent's connections with a real provider.
//!
//! Each accepted connection runs in its own task: its peer's uid is checked, its first frame
//! says what it is ([`Open`]), then [`control`] answers requests (each in a task of its own, so
//! a slow pull or a stop with a grace period never holds up a list) or [`run_stream`] runs one exec
//! or attach.

use std::io;
use std::os::unix::fs::{DirBuilderExt, PermissionsExt};
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::task::{ready, Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use provider_api::{AttachIo, ExecIo, Provider, ProviderError};
use serde::Serialize;
use tokio::io::AsyncWrite;
use tokio::net::{UnixListener, UnixStream};
use tokio::sync::{mpsc, Semaphore};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::{CancellationToken, PollSender};
use tokio_util::task::TaskTracker;

use crate::wire::{self, Call, Open, Request, RequestId, Response, StreamFrame, CHUNK};
use crate::{RuntimeIdentity, PROTOCOL_VERSION};

/// Requests one control connection may have in flight. The agent's callers are its pod workers
/// (a node runs at most 110 pods by default, each worker with a call or two in flight) and a
/// few node-wide loops (relist, stats, image GC, node status): 256 covers them all with room.
/// Past it the server stops reading, so a flooding peer meets backpressure, not an unbounded
/// pile of tasks.
pub(crate) const MAX_IN_FLIGHT: usize = 256;

/// Connections served at once. Each exec and attach holds one (`kubectl exec` sessions, exec
/// probes and hooks), besides the control connection: 1024 is far above what a node runs and
/// keeps the runtime well inside its file descriptor limit.
const MAX_CONNECTIONS: usize = 1024;

/// How long a new connection has to send its first frame; a peer that connects and says
/// nothing does not hold a connection slot for longer.
const OPEN_TIMEOUT: Duration = Duration::from_secs(10);

/// Output frames queued toward one stream's client before the command's writes wait: with
/// [`CHUNK`]-sized frames, 256 KiB in flight.
const OUTPUT_FRAMES: usize = 8;

/// Stdin frames queued toward one stream's command before the server stops reading the client.
const STDIN_FRAMES: usize = 8;

/// Binds `path` for [`serve`]: a stale socket file there is removed first, the parent
/// directory is created mode 0700 if missing, and the socket is made mode 0600.
pub fn bind(path: &Path) -> io::Result<UnixListener> {
    if let Some(parent) = path.parent().filter(|p| !p.as_os_str().is_empty()) {
        if !parent.exists() {
            std::fs::DirBuilder::new()
                .recursive(true)
                .mode(0o700)
                .create(parent)?;
        }
    }
    match std::fs::symlink_metadata(path) {
        Ok(meta) if std::os::unix::fs::FileTypeExt::is_socket(&meta.file_type()) => {
            std::fs::remove_file(path)?
        }
        Ok(_) => {
            return Err(io::Error::new(
                io::ErrorKind::AlreadyExists,
                format!(
                    "{} exists and is not a socket; not removing it",
                    path.display()
                ),
            ))
        }
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(e),
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

/// Serves `provider` on `listener` until `shutdown` is cancelled; every accepted connection in
/// its own task. On shutdown it stops accepting, closes every connection (the agent's calls
/// fail with Unavailable) and returns when their tasks have ended; requests already running
/// against the provider finish on their own.
pub async fn serve(
    listener: UnixListener,
    provider: Arc<dyn Provider>,
    shutdown: CancellationToken,
) {
    let identity = Arc::new(RuntimeIdentity::new(&*provider));
    tracing::info!(instance = %identity.instance, "provider socket serving");
    let connections = TaskTracker::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    loop {
        let accepted = tokio::select! {
            () = shutdown.cancelled() => break,
            accepted = async {
                let slot = slots.clone().acquire_owned().await;
                (slot, listener.accept().await)
            } => accepted,
        };
        match accepted {
            (Ok(slot), Ok((stream, _))) => {
                let (provider, identity, shutdown) =
                    (provider.clone(), identity.clone(), shutdown.clone());
                connections.spawn(async move {
                    tokio::select! {
                        () = connection(stream, provider, identity) => {}
                        () = shutdown.cancelled() => {}
                    }
                    drop(slot);
                });
            }
            (Err(_), _) => break,
            (_, Err(e)) => {
                // EMFILE and the like: wait a little rather than spin on accept.
                tracing::warn!(error = %e, "accepting a provider connection failed");
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        }
    }
    connections.close();
    connections.wait().await;
}

/// Whether the peer may use the runtime: the same uid as this process, or root.
fn peer_allowed(stream: &UnixStream) -> Result<(), String> {
    let cred = stream
        .peer_cred()
        .map_err(|e| format!("reading the peer's credentials: {e}"))?;
    // SAFETY: geteuid(2) cannot fail and touches no memory.
    let own = unsafe { libc::geteuid() };
    match cred.uid() {
        uid if uid == own || uid == 0 => Ok(()),
        uid => Err(format!(
            "peer uid {uid} (pid {}) is neither this runtime's uid {own} nor root",
            cred.pid().map_or("unknown".into(), |p| p.to_string())
        )),
    }
}

type Conn = Framed<UnixStream, LengthDelimitedCodec>;

/// One connection, from the credential check to its end.
async fn connection(
    stream: UnixStream,
    provider: Arc<dyn Provider>,
    identity: Arc<RuntimeIdentity>,
) {
    if let Err(reason) = peer_allowed(&stream) {
        tracing::warn!(%reason, "refused a provider connection");
        return;
    }
    let mut conn = Framed::new(stream, wire::codec());
    let open = match tokio::time::timeout(OPEN_TIMEOUT, conn.next()).await {
        Ok(Some(Ok(frame))) => serde_json::from_slice::<Open>(&frame),
        Ok(Some(Err(e))) => {
            return tracing::debug!(error = %e, "provider connection: unreadable first frame")
        }
        Ok(None) => return,
        Err(_) => {
            return tracing::debug!("provider connection: no first frame within {OPEN_TIMEOUT:?}")
        }
    };
    match open {
        Err(e) => {
            tracing::debug!(error = %e, "provider connection: the first frame is not an Open")
        }
        Ok(Open::Hello { protocol }) => control(conn, protocol, provider, &identity).await,
        Ok(Open::Exec {
            protocol,
            container_id,
            command,
            stdin,
            timeout,
        }) => {
            run_stream(
                conn,
                protocol,
                provider,
                Kind::Exec {
                    container_id,
                    command,
                    timeout,
                },
                stdin,
            )
            .await;
        }
        Ok(Open::Attach {
            protocol,
            container_id,
            stdin,
            stdout,
            stderr,
        }) => {
            run_stream(
                conn,
                protocol,
                provider,
                Kind::Attach {
                    container_id,
                    stdout,
                    stderr,
                },
                stdin,
            )
            .await;
        }
    }
}

/// The control connection: answers the hello, then every request in a task of its own, at
/// most [`MAX_IN_FLIGHT`] at once. Ends when the agent closes it (after answering what is in
/// flight) or sends something that is not a request.
async fn control(
    mut conn: Conn,
    protocol: u32,
    provider: Arc<dyn Provider>,
    identity: &RuntimeIdentity,
) {
    let welcome: Result<&RuntimeIdentity, ProviderError> = match protocol {
        PROTOCOL_VERSION => Ok(identity),
        other => Err(wire::mismatch(other, PROTOCOL_VERSION)),
    };
    let refused = welcome.is_err();
    let Ok(frame) = wire::json_frame(&welcome) else {
        return;
    };
    if conn.send(frame).await.is_err() || refused {
        return;
    }
    let (mut sink, mut frames) = conn.split();
    // Room for every in-flight request's answer, so an answering task never waits on it.
    let (answers, mut outgoing) = mpsc::channel::<Bytes>(MAX_IN_FLIGHT);
    let writer = async move {
        while let Some(frame) = outgoing.recv().await {
            if sink.send(frame).await.is_err() {
                break;
            }
        }
    };
    let reader = async move {
        let in_flight = Arc::new(Semaphore::new(MAX_IN_FLIGHT));
        loop {
            let Ok(permit) = in_flight.clone().acquire_owned().await else {
                break;
            };
            let frame = match frames.next().await {
                Some(Ok(frame)) => frame,
                Some(Err(e)) => {
                    break tracing::debug!(error = %e, "provider control connection: bad frame")
                }
                None => break,
            };
            let (id, call) = match serde_json::from_slice::<Request<Call>>(&frame) {
                Ok(request) => (request.id, Ok(request.call)),
                Err(e) => match serde_json::from_slice::<RequestId>(&frame) {
                    Ok(RequestId { id }) => (
                        id,
                        Err(ProviderError::Setup(format!(
                            "the runtime cannot read this request: {e}"
                        ))),
                    ),
                    Err(_) => {
                        break tracing::debug!(error = %e, "provider control connection: not a request")
                    }
                },
            };
            let (provider, answers) = (provider.clone(), answers.clone());
            tokio::spawn(async move {
                let result = match call {
                    // Its own task, so a provider that panics still gets an answer out.
                    Ok(call) => tokio::spawn(async move { dispatch(&*provider, call).await })
                        .await
                        .unwrap_or_else(|e| {
                            Err(ProviderError::Io(format!(
                                "the runtime failed while answering: {e}"
                            )))
                        }),
                    Err(e) => Err(e),
                };
                let _ = answers.send(answer(id, result)).await;
                drop(permit);
            });
        }
        // The writer ends once every task holding a clone of `answers` has answered.
    };
    tokio::join!(reader, writer);
}

/// The response frame for request `id`; an answer too large for a frame becomes an error.
fn answer(id: u64, result: Result<serde_json::Value, ProviderError>) -> Bytes {
    wire::json_frame(&Response { id, result }).unwrap_or_else(|reason| {
        let error = Err(ProviderError::Io(format!(
            "the runtime's answer could not be sent: {reason}"
        )));
        wire::json_frame(&Response { id, result: error }).unwrap_or_default()
    })
}

/// Runs one call against the provider; the return value as JSON.
async fn dispatch(provider: &dyn Provider, call: Call) -> Result<serde_json::Value, ProviderError> {
    fn json<T: Serialize>(value: T) -> Result<serde_json::Value, ProviderError> {
        serde_json::to_value(value)
            .map_err(|e| ProviderError::Io(format!("encoding the runtime's answer: {e}")))
    }
    match call {
        Call::Status => json(provider.status().await),
        Call::ImageStatus { reference } => json(provider.image_status(&reference).await),
        Call::PullImage { reference, auth } => json(provider.pull_image(&reference, &auth).await?),
        Call::RunPodSandbox { config } => json(provider.run_pod_sandbox(&config).await?),
        Call::RemovePodSandbox { sandbox_id, grace } => {
            json(provider.remove_pod_sandbox(&sandbox_id, grace).await?)
        }
        Call::CreateContainer { sandbox_id, config } => {
            json(provider.create_container(&sandbox_id, *config).await?)
        }
        Call::StartContainer { container_id } => {
            json(provider.start_container(&container_id).await?)
        }
        Call::StopContainer {
            container_id,
            grace,
        } => json(provider.stop_container(&container_id, grace).await?),
        Call::RemoveContainer { container_id } => {
            json(provider.remove_container(&container_id).await?)
        }
        Call::ListContainers => json(provider.list_containers().await?),
        Call::ListPodSandboxes => json(provider.list_pod_sandboxes().await?),
        Call::ImageFs => json(provider.image_fs().await),
        Call::ListImages => json(provider.list_images().await),
        Call::RemoveImage { reference } => json(provider.remove_image(&reference).await?),
        Call::PodListener { pod_uid, port } => json(provider.pod_listener(&pod_uid, port).await),
    }
}

/// What a stream connection runs.
enum Kind {
    Exec {
        container_id: String,
        command: Vec<String>,
        timeout: Option<Duration>,
    },
    Attach {
        container_id: String,
        stdout: bool,
        stderr: bool,
    },
}

/// One exec or attach stream. Stdin frames feed the command's stdin (end of stream or the
/// client leaving closes it); its output goes out as frames through a small bounded queue
/// (backpressure reaches the guest); the result is the last frame.
///
/// When the client leaves: an exec runs on to its end with its stdin closed and its output
/// discarded; an attach ends at once (the provider's call is dropped).
async fn run_stream(
    conn: Conn,
    protocol: u32,
    provider: Arc<dyn Provider>,
    kind: Kind,
    stdin: bool,
) {
    let (mut sink, frames) = conn.split();
    if protocol != PROTOCOL_VERSION {
        if let Ok(frame) =
            wire::json_frame(&Err::<(), _>(wire::mismatch(protocol, PROTOCOL_VERSION)))
        {
            let _ = sink.send(StreamFrame::Result(frame).encode()).await;
        }
        return;
    }
    let is_exec = matches!(kind, Kind::Exec { .. });
    let gone = CancellationToken::new();
    let (stdin_tx, stdin_rx) = mpsc::channel::<io::Result<Bytes>>(STDIN_FRAMES);
    let stdin_reader = stdin.then(|| {
        Box::pin(tokio_util::io::StreamReader::new(tokio_stream_of(stdin_rx)))
            as Pin<Box<dyn tokio::io::AsyncRead + Send>>
    });
    let (out_tx, mut out_rx) = mpsc::channel::<Bytes>(OUTPUT_FRAMES);
    let reader = read_client(frames, stdin.then_some(stdin_tx), gone.clone());
    // An exec's output is drained (and dropped) after the client has gone, so the command
    // runs on; an attach's queue closes, so the provider's next write fails.
    let writer = {
        let gone = gone.clone();
        async move {
            while let Some(frame) = out_rx.recv().await {
                if sink.send(frame).await.is_err() {
                    gone.cancel();
                    if !is_exec {
                        return;
                    }
                    while out_rx.recv().await.is_some() {}
                    return;
                }
            }
            let _ = sink.close().await;
        }
    };
    let run = {
        let gone = gone.clone();
        async move {
            let writer_of = |tag| {
                Box::pin(FrameWriter {
                    tag,
                    tx: PollSender::new(out_tx.clone()),
                }) as Pin<Box<dyn AsyncWrite + Send>>
            };
            let result = match kind {
                Kind::Exec {
                    container_id,
                    command,
                    timeout,
                } => {
                    let io = ExecIo {
                        stdin: stdin_reader,
                        stdout: writer_of(wire::STDOUT),
                        stderr: writer_of(wire::STDERR),
                        timeout,
                    };
                    wire::json_frame(&provider.exec(&container_id, command, io).await)
                }
                Kind::Attach {
                    container_id,
                    stdout,
                    stderr,
                } => {
                    let io = AttachIo {
                        stdin: stdin_reader,
                        stdout: stdout.then(|| writer_of(wire::STDOUT)),
                        stderr: stderr.then(|| writer_of(wire::STDERR)),
                    };
                    tokio::select! {
                        result = provider.attach(&container_id, io) => wire::json_frame(&result),
                        // The client left: nobody reads the attach any more.
                        () = gone.cancelled() => return,
                    }
                }
            };
            let result = result.unwrap_or_else(|reason| {
                wire::json_frame(&Err::<(), _>(ProviderError::Io(format!(
                    "the runtime's answer could not be sent: {reason}"
                ))))
                .unwrap_or_default()
            });
            let _ = out_tx.send(StreamFrame::Result(result).encode()).await;
        }
    };
    // The reader ends when the client leaves; the writer when the run has sent its result.
    let reader = async {
        reader.await;
        std::future::pending::<()>().await
    };
    tokio::select! {
        ((), ()) = async { tokio::join!(run, writer) } => {}
        () = reader => {}
    }
}

/// A receiver as a stream (for [`tokio_util::io::StreamReader`]).
fn tokio_stream_of(
    mut rx: mpsc::Receiver<io::Result<Bytes>>,
) -> impl futures::Stream<Item = io::Result<Bytes>> + Send {
    futures::stream::poll_fn(move |cx| rx.poll_recv(cx))
}

/// Reads a stream client's frames: stdin data into `stdin` (dropping it at stdin's end closes
/// the command's stdin). Returns, cancelling `gone`, when the client closes the connection or
/// sends anything a client may not.
async fn read_client(
    mut frames: futures::stream::SplitStream<Conn>,
    mut stdin: Option<mpsc::Sender<io::Result<Bytes>>>,
    gone: CancellationToken,
) {
    while let Some(Ok(frame)) = frames.next().await {
        match StreamFrame::decode(frame.freeze()) {
            Some(StreamFrame::Stdin(data)) => {
                if let Some(tx) = &stdin {
                    if tx.send(Ok(data)).await.is_err() {
                        // The command no longer reads stdin: the rest is dropped.
                        stdin = None;
                    }
                }
            }
            Some(StreamFrame::StdinEnd) => stdin = None,
            _ => break,
        }
    }
    drop(stdin);
    gone.cancel();
}

/// The command's stdout or stderr: each write becomes one tagged frame (at most [`CHUNK`]
/// bytes) on the stream's bounded queue; a write waits while the queue is full, and fails once
/// the queue is closed (the client has gone).
struct FrameWriter {
    tag: u8,
    tx: PollSender<Bytes>,
}

impl AsyncWrite for FrameWriter {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        if buf.is_empty() {
            return Poll::Ready(Ok(0));
        }
        let closed = || io::Error::new(io::ErrorKind::BrokenPipe, "the client has gone");
        if ready!(self.tx.poll_reserve(cx)).is_err() {
            return Poll::Ready(Err(closed()));
        }
        let n = buf.len().min(CHUNK);
        let frame = wire::tagged(self.tag, &buf[..n]);
        match self.tx.send_item(frame) {
            Ok(()) => Poll::Ready(Ok(n)),
            Err(_) => Poll::Ready(Err(closed())),
        }
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}
