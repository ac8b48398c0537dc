//! The agent side: [`RemoteProvider`], a [`Provider`] whose every call goes to the runtime
//! process over its socket.
//!
//! One control connection, made on first use and remade on the first call after it breaks;
//! its task ([`run_control`]) owns the socket and the table of calls waiting for an answer,
//! and fails every one of them with [`ProviderError::Unavailable`] the moment the connection
//! is lost. Exec and attach each open a connection of their own ([`RemoteProvider::open_stream`]).

use std::collections::HashMap;
use std::convert::Infallible;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, Weak};
use std::time::Duration;

use bytes::Bytes;
use futures::{SinkExt, StreamExt};
use provider_api::{
    AttachIo, ContainerConfig, ContainerSummary, ExecIo, ImageFsInfo, ImageInfo, ImageRecord,
    Provider, ProviderError, RegistryAuth, RuntimeInfo, RuntimeStatus, SandboxConfig,
};
use serde::de::DeserializeOwned;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::UnixStream;
use tokio::sync::{mpsc, oneshot, watch};
use tokio_util::codec::{Framed, LengthDelimitedCodec};
use tokio_util::sync::CancellationToken;

use crate::wire::{self, Call, Open, Request, Response, StreamFrame, CHUNK};
use crate::{RuntimeIdentity, PROTOCOL_VERSION};

/// How long connecting (and, on the control connection, the hello) may take. The runtime is a
/// local process: it answers in milliseconds or is not there; 2 s rides out a busy machine
/// without stalling the agent's loops for long when the runtime is down.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(2);

/// Calls queued toward the control connection's writer before callers wait.
const QUEUED_CALLS: usize = 64;

type Conn = Framed<UnixStream, LengthDelimitedCodec>;

/// A [`Provider`] served by another process (see the crate docs): the agent's side of the
/// runtime socket.
///
/// Calls are multiplexed over one control connection; none is timed out here (a pull or a stop
/// may take minutes), but all fail at once with [`ProviderError::Unavailable`] when the
/// connection drops, and the next call reconnects.
pub struct RemoteProvider {
    shared: Arc<Shared>,
}

/// What the provider and its connection task share.
struct Shared {
    socket: PathBuf,
    /// The live control connection, if any; the lock also makes callers wait for one connect.
    control: tokio::sync::Mutex<Option<Control>>,
    identity: watch::Sender<Option<RuntimeIdentity>>,
    /// The last identity's runtime info (what `runtime_info` reports while unreachable).
    info: Mutex<RuntimeInfo>,
    /// Bumped on every new control connection, so a lost old one does not clear a new identity.
    generation: AtomicU64,
}

/// A handle on the control connection's task.
#[derive(Clone)]
struct Control {
    calls: mpsc::Sender<Outgoing>,
    /// Cancelled when the connection is lost.
    lost: CancellationToken,
}

/// One call for the connection task: the request's call, and where its answer goes.
struct Outgoing {
    call: Call,
    answer: oneshot::Sender<Result<serde_json::Value, ProviderError>>,
}

impl RemoteProvider {
    /// Connects once (Hello) and returns the provider, or the reason it cannot
    /// ([`ProviderError::Unavailable`]; [`ProviderError::Setup`] when the runtime speaks
    /// another protocol version).
    pub async fn connect(socket: PathBuf) -> Result<Self, ProviderError> {
        let (identity, _) = watch::channel(None);
        let info = RuntimeInfo {
            name: "unknown".into(),
            version: "unknown".into(),
        };
        let shared = Arc::new(Shared {
            socket,
            control: tokio::sync::Mutex::new(None),
            identity,
            info: Mutex::new(info),
            generation: AtomicU64::new(0),
        });
        let provider = RemoteProvider { shared };
        provider.control().await?;
        Ok(provider)
    }

    /// The runtime now answering (`None` while it cannot be reached); changes on every
    /// reconnect to a new runtime process. Reconnecting is lazy: the identity comes back with
    /// the first call after the runtime is back.
    pub fn identity(&self) -> watch::Receiver<Option<RuntimeIdentity>> {
        self.shared.identity.subscribe()
    }

    /// The live control connection, connecting first if there is none.
    async fn control(&self) -> Result<Control, ProviderError> {
        let mut slot = self.shared.control.lock().await;
        if let Some(control) = slot.as_ref().filter(|c| !c.lost.is_cancelled()) {
            return Ok(control.clone());
        }
        *slot = None;
        let (conn, identity) = tokio::time::timeout(CONNECT_TIMEOUT, hello(&self.shared.socket))
            .await
            .map_err(|_| {
                ProviderError::Unavailable(format!(
                    "{}: no answer to the hello within {CONNECT_TIMEOUT:?}",
                    self.shared.socket.display()
                ))
            })??;
        let generation = self.shared.generation.fetch_add(1, Ordering::SeqCst) + 1;
        let (calls, queue) = mpsc::channel(QUEUED_CALLS);
        let control = Control {
            calls,
            lost: CancellationToken::new(),
        };
        tracing::info!(socket = %self.shared.socket.display(), instance = %identity.instance, pid = identity.pid, "connected to the runtime");
        *self.shared.info.lock().unwrap_or_else(|e| e.into_inner()) = identity.runtime_info.clone();
        self.shared.identity.send_replace(Some(identity));
        tokio::spawn(run_control(
            conn,
            queue,
            control.lost.clone(),
            Arc::downgrade(&self.shared),
            generation,
        ));
        *slot = Some(control.clone());
        Ok(control)
    }

    /// Sends `call` and waits for its answer, decoded as `T`.
    async fn call<T: DeserializeOwned>(&self, call: Call) -> Result<T, ProviderError> {
        let method = call.method();
        let control = self.control().await?;
        let (answer, answered) = oneshot::channel();
        let lost = || {
            ProviderError::Unavailable(format!("{method}: the connection to the runtime was lost"))
        };
        control
            .calls
            .send(Outgoing { call, answer })
            .await
            .map_err(|_| lost())?;
        let value = answered.await.map_err(|_| lost())??;
        serde_json::from_value(value).map_err(|e| {
            ProviderError::Io(format!(
                "{method}: the runtime's answer is not what this agent expects: {e}"
            ))
        })
    }

    /// A new connection for one exec or attach, its first frame sent.
    async fn open_stream(&self, open: Open) -> Result<Conn, ProviderError> {
        let socket = &self.shared.socket;
        let connect = async {
            let mut conn = Framed::new(
                UnixStream::connect(socket)
                    .await
                    .map_err(|e| unavailable(socket, e))?,
                wire::codec(),
            );
            let frame = wire::json_frame(&open).map_err(|reason| {
                ProviderError::Exec(format!("the request cannot be sent: {reason}"))
            })?;
            conn.send(frame).await.map_err(|e| unavailable(socket, e))?;
            Ok(conn)
        };
        tokio::time::timeout(CONNECT_TIMEOUT, connect)
            .await
            .map_err(|_| {
                ProviderError::Unavailable(format!(
                    "{}: not connected within {CONNECT_TIMEOUT:?}",
                    socket.display()
                ))
            })?
    }
}

fn unavailable(socket: &Path, e: std::io::Error) -> ProviderError {
    ProviderError::Unavailable(format!("{}: {e}", socket.display()))
}

/// Connects to `socket` and says hello; the connection and who answered.
async fn hello(socket: &Path) -> Result<(Conn, RuntimeIdentity), ProviderError> {
    let stream = UnixStream::connect(socket)
        .await
        .map_err(|e| unavailable(socket, e))?;
    let mut conn = Framed::new(stream, wire::codec());
    let frame = wire::json_frame(&Open::Hello {
        protocol: PROTOCOL_VERSION,
    })
    .map_err(|e| ProviderError::Unavailable(e.to_string()))?;
    conn.send(frame).await.map_err(|e| unavailable(socket, e))?;
    let answer = match conn.next().await {
        Some(Ok(frame)) => frame,
        Some(Err(e)) => return Err(unavailable(socket, e)),
        // The server closes without a word on a peer it refuses.
        None => return Err(ProviderError::Unavailable(format!("{}: the runtime closed the connection at the hello (is it running as this agent's user?)", socket.display()))),
    };
    let welcome: Result<RuntimeIdentity, ProviderError> =
        serde_json::from_slice(&answer).map_err(|e| {
            ProviderError::Unavailable(format!(
                "{}: the answer to the hello is not the provider protocol: {e}",
                socket.display()
            ))
        })?;
    let identity = welcome?;
    if identity.protocol != PROTOCOL_VERSION {
        return Err(wire::mismatch(PROTOCOL_VERSION, identity.protocol));
    }
    Ok((conn, identity))
}

/// The control connection's task: writes queued calls with fresh ids, hands each answer to its
/// waiter. On loss (or when the provider is dropped) every waiter gets Unavailable with the
/// reason, `lost` is cancelled and the identity goes to `None` (unless a newer connection
/// has replaced this one).
async fn run_control(
    conn: Conn,
    mut queue: mpsc::Receiver<Outgoing>,
    lost: CancellationToken,
    shared: Weak<Shared>,
    generation: u64,
) {
    let (mut sink, mut frames) = conn.split();
    // Owned by this task alone; the writer and the reader below take turns on it.
    let waiting: Mutex<HashMap<u64, oneshot::Sender<Result<serde_json::Value, ProviderError>>>> =
        Mutex::new(HashMap::new());
    let waiters = || waiting.lock().unwrap_or_else(|e| e.into_inner());
    let write = async {
        let mut next_id: u64 = 0;
        while let Some(Outgoing { call, answer }) = queue.recv().await {
            next_id += 1;
            let frame = match wire::json_frame(&Request { id: next_id, call }) {
                Ok(frame) => frame,
                Err(reason) => {
                    let _ = answer.send(Err(ProviderError::Io(format!(
                        "the request cannot be sent: {reason}"
                    ))));
                    continue;
                }
            };
            waiters().insert(next_id, answer);
            if let Err(e) = sink.send(frame).await {
                return format!("writing to the runtime: {e}");
            }
        }
        "the provider was dropped".to_string()
    };
    let read = async {
        loop {
            let frame: Bytes = match frames.next().await {
                Some(Ok(frame)) => frame.freeze(),
                Some(Err(e)) => return format!("reading from the runtime: {e}"),
                None => return "the runtime closed the connection".to_string(),
            };
            match serde_json::from_slice::<Response>(&frame) {
                Ok(Response { id, result }) => {
                    if let Some(answer) = waiters().remove(&id) {
                        let _ = answer.send(result);
                    }
                }
                Err(e) => return format!("the runtime sent something that is not a response: {e}"),
            }
        }
    };
    let reason = tokio::select! {
        reason = write => reason,
        reason = read => reason,
    };
    tracing::warn!(%reason, "lost the connection to the runtime");
    lost.cancel();
    for (_, answer) in waiters().drain() {
        let _ = answer.send(Err(ProviderError::Unavailable(format!(
            "the connection to the runtime was lost: {reason}"
        ))));
    }
    if let Some(shared) = shared.upgrade() {
        shared.identity.send_if_modified(|identity| {
            let current = shared.generation.load(Ordering::SeqCst) == generation;
            if current {
                *identity = None;
            }
            current
        });
    }
}

/// Copies the caller's stdin into stdin frames, then a stdin-end frame; never returns (the
/// output side decides when the stream is over).
async fn pump_stdin(
    stdin: Option<std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>>,
    sink: &mut futures::stream::SplitSink<Conn, Bytes>,
) -> Infallible {
    if let Some(mut stdin) = stdin {
        let mut buf = vec![0u8; CHUNK];
        loop {
            match stdin.read(&mut buf).await {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    if sink
                        .send(StreamFrame::Stdin(Bytes::copy_from_slice(&buf[..n])).encode())
                        .await
                        .is_err()
                    {
                        return std::future::pending().await;
                    }
                }
            }
        }
        let _ = sink.send(StreamFrame::StdinEnd.encode()).await;
    }
    std::future::pending().await
}

/// The result frame's JSON as `Result<T, ProviderError>`.
fn stream_result<T: DeserializeOwned>(what: &str, data: &[u8]) -> Result<T, ProviderError> {
    serde_json::from_slice::<Result<T, ProviderError>>(data).map_err(|e| {
        ProviderError::Io(format!(
            "{what}: the runtime's result is not what this agent expects: {e}"
        ))
    })?
}

fn lost_mid(what: &str) -> ProviderError {
    ProviderError::Unavailable(format!("{what}: the connection to the runtime was lost"))
}

#[async_trait::async_trait]
impl Provider for RemoteProvider {
    /// The last identity's runtime info (still reported while the runtime is unreachable).
    fn runtime_info(&self) -> RuntimeInfo {
        self.shared
            .info
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .clone()
    }

    async fn status(&self) -> RuntimeStatus {
        match self.call(Call::Status).await {
            Ok(status) => status,
            Err(e) => RuntimeStatus::NotReady {
                message: e.to_string(),
            },
        }
    }

    async fn image_status(&self, reference: &str) -> Option<ImageInfo> {
        self.call(Call::ImageStatus {
            reference: reference.into(),
        })
        .await
        .unwrap_or_else(|e| {
            tracing::debug!(reference, error = %e, "image_status: unknown");
            None
        })
    }

    async fn pull_image(
        &self,
        reference: &str,
        auth: &[RegistryAuth],
    ) -> Result<ImageInfo, ProviderError> {
        self.call(Call::PullImage {
            reference: reference.into(),
            auth: auth.to_vec(),
        })
        .await
    }

    async fn run_pod_sandbox(&self, config: &SandboxConfig) -> Result<String, ProviderError> {
        self.call(Call::RunPodSandbox {
            config: config.clone(),
        })
        .await
    }

    async fn remove_pod_sandbox(
        &self,
        sandbox_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        self.call(Call::RemovePodSandbox {
            sandbox_id: sandbox_id.into(),
            grace,
        })
        .await
    }

    async fn create_container(
        &self,
        sandbox_id: &str,
        config: ContainerConfig,
    ) -> Result<String, ProviderError> {
        self.call(Call::CreateContainer {
            sandbox_id: sandbox_id.into(),
            config: Box::new(config),
        })
        .await
    }

    async fn start_container(&self, container_id: &str) -> Result<(), ProviderError> {
        self.call(Call::StartContainer {
            container_id: container_id.into(),
        })
        .await
    }

    async fn stop_container(
        &self,
        container_id: &str,
        grace: Duration,
    ) -> Result<(), ProviderError> {
        self.call(Call::StopContainer {
            container_id: container_id.into(),
            grace,
        })
        .await
    }

    async fn remove_container(&self, container_id: &str) -> Result<(), ProviderError> {
        self.call(Call::RemoveContainer {
            container_id: container_id.into(),
        })
        .await
    }

    async fn list_containers(&self) -> Result<Vec<ContainerSummary>, ProviderError> {
        self.call(Call::ListContainers).await
    }

    async fn list_pod_sandboxes(&self) -> Result<Vec<SandboxConfig>, ProviderError> {
        self.call(Call::ListPodSandboxes).await
    }

    /// `None` also while the runtime is unreachable.
    async fn image_fs(&self) -> Option<ImageFsInfo> {
        self.call(Call::ImageFs).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "image_fs: unknown");
            None
        })
    }

    /// Empty while the runtime is unreachable (image GC then finds nothing to remove).
    async fn list_images(&self) -> Vec<ImageRecord> {
        self.call(Call::ListImages).await.unwrap_or_else(|e| {
            tracing::debug!(error = %e, "list_images: unknown");
            Vec::new()
        })
    }

    async fn remove_image(&self, reference: &str) -> Result<u64, ProviderError> {
        self.call(Call::RemoveImage {
            reference: reference.into(),
        })
        .await
    }

    /// Exec on a connection of its own. Output is written to `io` as it arrives; a writer of
    /// the caller's that fails drops the rest of that stream's output (the command runs on and
    /// its exit code still comes back).
    async fn exec(
        &self,
        container_id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        let ExecIo {
            stdin,
            mut stdout,
            mut stderr,
            timeout,
        } = io;
        let open = Open::Exec {
            protocol: PROTOCOL_VERSION,
            container_id: container_id.into(),
            command,
            stdin: stdin.is_some(),
            timeout,
        };
        let (mut sink, mut frames) = self.open_stream(open).await?.split();
        let what = format!("exec in container {container_id}");
        let output = async {
            let (mut stdout_ok, mut stderr_ok) = (true, true);
            loop {
                let frame = match frames.next().await {
                    Some(Ok(frame)) => frame.freeze(),
                    _ => return Err(lost_mid(&what)),
                };
                match StreamFrame::decode(frame) {
                    Some(StreamFrame::Stdout(data)) if stdout_ok => {
                        stdout_ok =
                            stdout.write_all(&data).await.is_ok() && stdout.flush().await.is_ok()
                    }
                    Some(StreamFrame::Stderr(data)) if stderr_ok => {
                        stderr_ok =
                            stderr.write_all(&data).await.is_ok() && stderr.flush().await.is_ok()
                    }
                    Some(StreamFrame::Stdout(_) | StreamFrame::Stderr(_)) => {}
                    Some(StreamFrame::Result(data)) => return stream_result(&what, &data),
                    _ => {
                        return Err(ProviderError::Io(format!(
                            "{what}: the runtime sent a frame a server may not"
                        )))
                    }
                }
            }
        };
        tokio::select! {
            result = output => result,
            never = pump_stdin(stdin, &mut sink) => match never {},
        }
    }

    /// Attach on a connection of its own; returns when the container ends, when a writer of the
    /// caller's fails (the caller stopped reading: closing the connection ends the runtime's
    /// attach too), or, with only stdin attached, when it ends.
    async fn attach(&self, container_id: &str, io: AttachIo) -> Result<(), ProviderError> {
        let AttachIo {
            stdin,
            mut stdout,
            mut stderr,
        } = io;
        let open = Open::Attach {
            protocol: PROTOCOL_VERSION,
            container_id: container_id.into(),
            stdin: stdin.is_some(),
            stdout: stdout.is_some(),
            stderr: stderr.is_some(),
        };
        let (mut sink, mut frames) = self.open_stream(open).await?.split();
        let what = format!("attach to container {container_id}");
        let output = async {
            loop {
                let frame = match frames.next().await {
                    Some(Ok(frame)) => frame.freeze(),
                    _ => return Err(lost_mid(&what)),
                };
                let (writer, data) = match StreamFrame::decode(frame) {
                    Some(StreamFrame::Stdout(data)) => (stdout.as_mut(), data),
                    Some(StreamFrame::Stderr(data)) => (stderr.as_mut(), data),
                    Some(StreamFrame::Result(data)) => return stream_result(&what, &data),
                    _ => {
                        return Err(ProviderError::Io(format!(
                            "{what}: the runtime sent a frame a server may not"
                        )))
                    }
                };
                if let Some(writer) = writer {
                    if writer.write_all(&data).await.is_err() || writer.flush().await.is_err() {
                        return Ok(());
                    }
                }
            }
        };
        tokio::select! {
            result = output => result,
            never = pump_stdin(stdin, &mut sink) => match never {},
        }
    }

    /// `None` also while the runtime is unreachable.
    async fn pod_listener(&self, pod_uid: &str, port: u16) -> Option<std::net::SocketAddr> {
        self.call(Call::PodListener {
            pod_uid: pod_uid.into(),
            port,
        })
        .await
        .unwrap_or_else(|e| {
            tracing::debug!(pod_uid, port, error = %e, "pod_listener: unknown");
            None
        })
    }
}
