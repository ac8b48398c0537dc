//! Attach: a client joins a running container's stdio (`kubectl attach`, `kubectl run -i`).
//!
//! Output: an attached client follows the container's CRI log file from the moment it attaches
//! (what came before is `kubectl logs`): the entries appended to it are decoded and split by
//! stream ([`crate::log::LogFollower`]), whoever writes them (the log driver the shim runs, or
//! the agent's FIFO readers for a `stdin: true` container). So attaching takes nothing from the
//! log and a slow client holds nothing up. The output ends when the container's task has exited
//! and the log has not grown for [`QUIET_AFTER_EXIT`] (the writer may still be draining the
//! pipes). A line not yet ended reaches the client when it ends (as it reaches the log).
//!
//! Input: a container created with `stdin: true` gets a stdin FIFO at task creation; the
//! provider holds it open read-write (it never blocks, and nothing written is lost before the
//! shim opens its end) and copies each attached client's stdin into it. The shim holds a write
//! end of its own until Tasks.CloseIO, so neither a client's end nor the provider's closes the
//! container's stdin by itself. With `stdinOnce: true`, when the first attached client's stdin
//! ends the provider closes its end and calls CloseIO: the shim reads end of file and closes
//! the container's stdin. Without `stdin: true` attaching stdin is refused.

use std::collections::HashMap;
use std::future::Future;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;
use std::time::{Duration, Instant};

use containerd_client::services::v1::CloseIoRequest;
use provider_api::{AttachIo, ProviderError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::Mutex;

use crate::client::Client;
use crate::log::{LogFollower, Stream};

/// How often an attached client's copy looks for new log entries: often enough for typing
/// (well under the ~100 ms a person notices), cheap (one read and one stat of a local file).
const FOLLOW_POLL: Duration = Duration::from_millis(50);

/// After the container's task exited, the output is over once the log has not grown for this
/// long: the log's writer reads what the container left in its pipes (at most 64 KiB each)
/// within milliseconds; half a second covers a loaded machine's scheduling.
pub(crate) const QUIET_AFTER_EXIT: Duration = Duration::from_millis(500);

/// The write end of a container's stdin FIFO; `None` inside once closed (stdinOnce).
type StdinPipe = Arc<Mutex<Option<pipe::Sender>>>;

/// The attachable streams of every container the provider runs.
#[derive(Default)]
pub(crate) struct Streams {
    inner: std::sync::Mutex<HashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    stdin: Option<StdinPipe>,
}

impl Streams {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// Opens container `id`'s stdin FIFO at `path` read-write (it never blocks, and the shim's
    /// reader sees end of file only when the provider closes it) and keeps it for attach.
    pub(crate) fn open_stdin(&self, id: &str, path: &Path) -> std::io::Result<()> {
        let sender = pipe::OpenOptions::new()
            .read_write(true)
            .open_sender(path)?;
        self.entries().entry(id.to_string()).or_default().stdin =
            Some(Arc::new(Mutex::new(Some(sender))));
        Ok(())
    }

    /// Forgets container `id` (closing its stdin).
    pub(crate) fn forget(&self, id: &str) {
        self.entries().remove(id);
    }

    fn stdin(&self, id: &str) -> Option<StdinPipe> {
        self.entries().get(id)?.stdin.clone()
    }

    /// Serves one attached client of the running container `id` (`name` for messages, `log`
    /// its CRI log, `exited` resolves when its task has exited) until its output ends, the
    /// client stops reading, or (with only stdin attached) the client's stdin ends.
    /// `stdin_enabled`/`stdin_once` are the container's `stdin`/`stdinOnce`.
    #[allow(clippy::too_many_arguments)]
    pub(crate) async fn attach(
        &self,
        client: &Client,
        id: &str,
        name: &str,
        stdin_enabled: bool,
        stdin_once: bool,
        log: &Path,
        exited: impl Future<Output = ()>,
        io: AttachIo,
    ) -> Result<(), ProviderError> {
        let AttachIo {
            stdin,
            stdout,
            stderr,
        } = io;
        let pipe = match (&stdin, stdin_enabled) {
            (None, _) => None,
            (Some(_), false) => {
                return Err(ProviderError::Exec(format!(
                    "container {name}: stdin is not enabled (the container spec has no `stdin: true`), so it cannot be attached to"
                )))
            }
            (Some(_), true) => Some(self.stdin(id).ok_or_else(|| {
                ProviderError::Exec(format!(
                    "container {name}: its stdin is closed (stdinOnce, or the agent restarted since it started)"
                ))
            })?),
        };
        // From here on: what the container writes in reply to the client's input included.
        let follower = LogFollower::at_end(log);
        let input = async {
            if let (Some(source), Some(pipe)) = (stdin, &pipe) {
                if copy_stdin(source, pipe, stdin_once).await {
                    close_stdin(client, id).await;
                }
            }
        };
        if stdout.is_some() || stderr.is_some() {
            // The client's stdin ending does not end the attach: output goes on until the
            // container's ends or the client goes away.
            let input = async {
                input.await;
                std::future::pending::<()>().await
            };
            tokio::select! {
                () = copy_output(follower, exited, stdout, stderr) => {}
                () = input => {}
            }
        } else {
            tokio::select! {
                () = input => {}
                () = copy_output(follower, exited, None, None) => {}
            }
        }
        Ok(())
    }
}

/// Copies the client's stdin into the container's until either ends; when `once`, closes the
/// provider's end afterwards and returns true (the shim's end is the caller's to close).
async fn copy_stdin(
    mut client: Pin<Box<dyn AsyncRead + Send>>,
    pipe: &StdinPipe,
    once: bool,
) -> bool {
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = match client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Several clients may be attached: each chunk goes in whole.
        let mut guard = pipe.lock().await;
        let Some(writer) = guard.as_mut() else {
            return false;
        };
        if writer.write_all(&buf[..n]).await.is_err() {
            return false;
        }
    }
    if once {
        pipe.lock().await.take();
    }
    once
}

/// Closes the shim's write end of container `id`'s stdin (Tasks.CloseIO): with the provider's
/// closed, the shim reads end of file and closes the container's stdin.
pub(crate) async fn close_stdin(client: &Client, id: &str) {
    close_io(client, id, "").await;
}

/// Tasks.CloseIO of the process `exec_id` (empty: the container's own) of container `id`.
pub(crate) async fn close_io(client: &Client, id: &str, exec_id: &str) {
    let closed = client
        .tasks()
        .close_io(client.req(CloseIoRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
            stdin: true,
        }))
        .await;
    if let Err(e) = closed {
        tracing::debug!(id, exec_id, error = %e.message(), "closing stdin failed");
    }
}

/// Writes the container's output, as it is appended to its log, to the client until the output
/// ends (the task exited and the log stayed quiet for [`QUIET_AFTER_EXIT`]) or a writer fails
/// (the client went away).
async fn copy_output(
    mut follower: LogFollower,
    exited: impl Future<Output = ()>,
    mut stdout: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    mut stderr: Option<Pin<Box<dyn AsyncWrite + Send>>>,
) {
    let mut exited = std::pin::pin!(exited);
    // Since when the log has been quiet after the exit; `None` while the task runs.
    let mut quiet_since: Option<Instant> = None;
    loop {
        let entries = follower.read_new();
        if let Some(since) = &mut quiet_since {
            if !entries.is_empty() {
                *since = Instant::now();
            } else if since.elapsed() >= QUIET_AFTER_EXIT {
                break;
            }
        }
        for (stream, bytes) in entries {
            let writer = match stream {
                Stream::Stdout => stdout.as_mut(),
                Stream::Stderr => stderr.as_mut(),
            };
            if let Some(writer) = writer {
                if writer.write_all(&bytes).await.is_err() || writer.flush().await.is_err() {
                    return;
                }
            }
        }
        tokio::select! {
            () = &mut exited, if quiet_since.is_none() => quiet_since = Some(Instant::now()),
            () = tokio::time::sleep(FOLLOW_POLL) => {}
        }
    }
    for writer in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_from_now_on_until_the_exit_and_the_log_is_quiet() {
        let dir = std::env::temp_dir().join(format!("ctd-attach-out-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("0.log");
        let log = crate::log::ContainerLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"before\n");
        let follower = LogFollower::at_end(&path);
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        let (err_w, mut err_r) = tokio::io::duplex(1024);
        log.write(Stream::Stdout, b"after\n");
        log.write(Stream::Stderr, b"oops\n");
        let (exit_tx, exit_rx) = tokio::sync::oneshot::channel::<()>();
        let exited = async move {
            let _ = exit_rx.await;
        };
        let copy = tokio::spawn(copy_output(
            follower,
            exited,
            Some(Box::pin(out_w)),
            Some(Box::pin(err_w)),
        ));
        let mut got = vec![0u8; 6];
        out_r.read_exact(&mut got).await.unwrap();
        assert_eq!(got, b"after\n");
        // Written around the exit, before the writer has drained the pipes: still given.
        exit_tx.send(()).unwrap();
        log.write(Stream::Stdout, b"last\n");
        copy.await.unwrap();
        let (mut out, mut err) = (String::new(), String::new());
        out_r.read_to_string(&mut out).await.unwrap();
        err_r.read_to_string(&mut err).await.unwrap();
        assert_eq!((out.as_str(), err.as_str()), ("last\n", "oops\n"));
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn stdin_once_closes_the_fifo_when_the_client_ends() {
        let dir = std::env::temp_dir().join(format!("ctd-attach-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        for once in [true, false] {
            let path = dir.join(format!("stdin-{once}"));
            crate::mkfifo(&path).unwrap();
            let streams = Streams::default();
            streams.open_stdin("c", &path).unwrap();
            // The shim's end, opened after the provider's as on task creation.
            let mut shim = pipe::OpenOptions::new().open_receiver(&path).unwrap();
            let pipe = streams.stdin("c").unwrap();
            assert_eq!(
                copy_stdin(Box::pin(&b"typed\n"[..]), &pipe, once).await,
                once
            );
            let mut got = vec![0u8; 6];
            shim.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"typed\n");
            assert_eq!(pipe.lock().await.is_none(), once, "stdinOnce={once}");
            if once {
                assert_eq!(shim.read(&mut got).await.unwrap(), 0, "end of file");
            }
        }
        let _ = std::fs::remove_dir_all(&dir);
    }
}
