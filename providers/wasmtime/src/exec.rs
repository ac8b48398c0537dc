//! Exec: the container's program run again, as a new instance in the same sandbox.
//!
//! Start at [`run`]. The instance gets what the container was granted (its env, one preopen per
//! mount, its working dir) with argv = the exec command, and its
//! stdin/stdout/stderr wired to the caller's [`ExecIo`] streams, never to the container's log.
//!
//! Output streams: WASI stdout/stderr are [`AsyncStdoutStream`]s over the caller's writers. A
//! preview1 `fd_write` (and Rust's std on preview2) is a blocking write-and-flush, so each write
//! has reached the caller's writer before the guest goes on: the caller sees output as it is
//! written, and a caller that stops reading holds the guest (until the timeout).
//!
//! Exit codes are the container's: the guest's own, 1 for a trap (the trap is one line on
//! stderr), 137 for the memory limit (the exec's allocations count on the container's one
//! budget with its instance's and its other execs', see [`crate::memory`]; the reason is one
//! line on stderr) or a container that ended under the exec (a container's
//! end ends its execs, as a pid namespace does). A timeout interrupts the instance at the next
//! epoch tick and is [`ProviderError::Timeout`].

use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use provider_api::{ContainerConfig, ExecIo, ExitReason, ProviderError};
use tokio::io::{AsyncRead, AsyncWrite, ReadBuf};
use tokio_util::sync::CancellationToken;
use wasmtime::Engine;
use wasmtime_wasi::cli::{AsyncStdinStream, AsyncStdoutStream, IsTerminal, StdoutStream};
use wasmtime_wasi::p2::OutputStream;

use crate::instance::{classify, Instance};
use crate::sandbox::{granted_context, UsageMeter};

/// How many bytes the guest may hand to one output stream before its write waits for the
/// caller's writer: 64 KiB is a pipe buffer on Linux, enough for any line, small enough to hold
/// back a guest whose reader is slow.
const WRITE_BUDGET: usize = 64 * 1024;

/// After the run, how long the last output (and the trap line) may take to reach the caller's
/// writers, so a caller that stopped reading cannot hold the exec forever.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

/// Runs `command` as a new instance of the container's `instance` (see the module docs).
/// `container_stop` is the container's stop token: when it is cancelled (the container is
/// killed or has ended) the exec instance is interrupted too.
/// The exec's CPU time and memory count on the container's `meter`.
#[allow(clippy::too_many_arguments)]
pub async fn run(
    engine: &Engine,
    instance: &Instance,
    config: &ContainerConfig,
    network: &crate::network::NetworkPolicy,
    command: Vec<String>,
    io: ExecIo,
    container_stop: &CancellationToken,
    meter: &Arc<UsageMeter>,
) -> Result<i32, ProviderError> {
    let program = command.first().cloned().ok_or_else(|| {
        ProviderError::Exec(format!(
            "exec in container {}: the command is empty",
            config.name
        ))
    })?;
    let mut wasi = granted_context(config, network, &command).map_err(|e| {
        ProviderError::Io(format!(
            "exec {program:?} in container {}: {e}",
            config.name
        ))
    })?;
    let stdout = ExecOutput::new(io.stdout);
    let stderr = ExecOutput::new(io.stderr);
    wasi.stdout(stdout.clone()).stderr(stderr.clone());
    if let Some(stdin) = io.stdin {
        wasi.stdin(AsyncStdinStream::new(Exclusive(stdin)));
    }

    let stop = container_stop.child_token();
    // The exec's stores charge the container's memory budget (on `meter`), which the running
    // instance and every other exec share: an exec gets what is left, never a limit of its own.
    let execute = instance.execute(engine, wasi, stop.clone(), meter);
    let (result, refused, timed_out) = match io.timeout {
        None => {
            let (result, refused) = execute.await;
            (result, refused, None)
        }
        Some(timeout) => {
            tokio::pin!(execute);
            tokio::select! {
                biased;
                (result, refused) = &mut execute => (result, refused, None),
                () = tokio::time::sleep(timeout) => {
                    // Interrupts the guest at its next epoch check (or drops a guest parked in
                    // a host call shortly after), then waits for the store to unwind.
                    stop.cancel();
                    let (result, refused) = execute.await;
                    (result, refused, Some(timeout))
                }
            }
        }
    };

    if let Some(timeout) = timed_out {
        // No final flush: what the guest wrote went out with each write already, and waiting
        // on a caller that stopped reading (perhaps why it timed out) would outlast the timeout.
        tracing::debug!(
            timeout_ms = timeout.as_millis() as u64,
            "exec timed out; interrupted"
        );
        return Err(ProviderError::Timeout(format!(
            "exec {program:?} in container {} timed out after {timeout:?}",
            config.name
        )));
    }
    let exit = classify(result, refused, stop.is_cancelled());
    let message = match exit.reason {
        ExitReason::Killed => Some("killed: the container stopped during the exec".to_string()),
        ExitReason::OomKilled => exit.message.map(|m| format!("exec {program:?} in container {}: out of memory: {m} (the container's instance and its execs share its limit)", config.name)),
        _ => exit.message,
    };
    tracing::debug!(
        exit_code = exit.exit_code,
        message = message.as_deref().unwrap_or(""),
        "exec ended"
    );
    finish(&stdout, &stderr, message).await;
    Ok(exit.exit_code)
}

/// Writes the one-line `message` (a trap, a kill) to stderr and flushes both streams, within
/// [`FLUSH_WAIT`].
async fn finish(stdout: &ExecOutput, stderr: &ExecOutput, message: Option<String>) {
    let done = async {
        if let Some(message) = message {
            stderr.write_line(&message).await;
        }
        stdout.flush().await;
        stderr.flush().await;
    };
    if tokio::time::timeout(FLUSH_WAIT, done).await.is_err() {
        tracing::debug!(
            "exec output not taken by the caller within {FLUSH_WAIT:?}; dropping the rest"
        );
    }
}

/// One of the exec's output streams. The guest may open it many times (each `get-stdout`);
/// every handle, and the host's trap line, go through the one [`AsyncStdoutStream`].
#[derive(Clone)]
struct ExecOutput(Arc<AsyncStdoutStream>);

impl ExecOutput {
    fn new(writer: Pin<Box<dyn AsyncWrite + Send>>) -> Self {
        Self(Arc::new(AsyncStdoutStream::new(
            WRITE_BUDGET,
            Exclusive(writer),
        )))
    }

    /// Writes `line` and a newline, waiting until the writer has it. A failed writer (the
    /// caller went away) is not an error of the exec.
    async fn write_line(&self, line: &str) {
        let mut stream = self.0.p2_stream();
        let _ = stream
            .blocking_write_and_flush(bytes::Bytes::from(format!("{line}\n")))
            .await;
    }

    /// Waits until everything written so far has been flushed to the writer.
    async fn flush(&self) {
        let mut stream = self.0.p2_stream();
        if stream.flush().is_ok() {
            let _ = stream.write_ready().await;
        }
    }
}

impl IsTerminal for ExecOutput {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for ExecOutput {
    fn async_stream(&self) -> Box<dyn AsyncWrite + Send + Sync> {
        self.0.async_stream()
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        self.0.p2_stream()
    }
}

/// A `Send` stream made `Sync`, as wasmtime-wasi's stdio adapters require, by allowing no
/// access at all through `&self`.
pub(crate) struct Exclusive<T>(pub(crate) T);

// SAFETY: `Sync` lets `&Exclusive<T>` be shared between threads. Nothing can be done with such a
// reference: every method reaches `T` only through `Pin<&mut Self>` (exclusive access), so
// sharing it cannot race (the reasoning of std's unstable `Exclusive`).
unsafe impl<T: Send> Sync for Exclusive<T> {}

impl<T: AsyncRead + Unpin> AsyncRead for Exclusive<T> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_read(cx, buf)
    }
}

impl<T: AsyncWrite + Unpin> AsyncWrite for Exclusive<T> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.get_mut().0).poll_write(cx, buf)
    }
    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_flush(cx)
    }
    fn poll_shutdown(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.get_mut().0).poll_shutdown(cx)
    }
}
