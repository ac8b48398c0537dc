//! Attach: a client joins a running container's stdio (`kubectl attach`, `kubectl run -i`).
//!
//! Output: the threads that copy the task's stdout/stderr FIFOs into the CRI log
//! ([`crate::log::ContainerLog::copy_from`]) also hand every chunk, as read, to a broadcast
//! channel; an attached client subscribes to it, so it sees output from the moment it attaches
//! (what came before is `kubectl logs`), and the log file still gets everything. The channel
//! closes when both copies reach end of file (the container's processes are gone).
//!
//! Input: a container created with `stdin: true` gets a stdin FIFO at task creation; the
//! provider holds it open read-write (it never blocks, and nothing written is lost before the
//! shim opens its end) and copies each attached client's stdin into it. The shim holds a write
//! end of its own until Tasks.CloseIO, so neither a client's end nor the provider's closes the
//! container's stdin by itself. With `stdinOnce: true`, when the first attached client's stdin
//! ends the provider closes its end and calls CloseIO: the shim reads end of file and closes
//! the container's stdin. Without `stdin: true` attaching stdin is refused.

use std::collections::HashMap;
use std::path::Path;
use std::pin::Pin;
use std::sync::Arc;

use containerd_client::services::v1::CloseIoRequest;
use provider_api::{AttachIo, ProviderError};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::sync::{broadcast, Mutex};

use crate::client::Client;
use crate::log::{Stream, Tee};

/// Chunks of output an attached client may fall behind by before it misses some (it is told
/// in the provider's debug log; the log file has everything).
const OUTPUT_BACKLOG: usize = 1024;

/// The write end of a container's stdin FIFO; `None` inside once closed (stdinOnce).
type StdinPipe = Arc<Mutex<Option<pipe::Sender>>>;

/// The attachable streams of every container the provider runs.
#[derive(Default)]
pub(crate) struct Streams {
    inner: std::sync::Mutex<HashMap<String, Entry>>,
}

#[derive(Default)]
struct Entry {
    /// Weak: the copy threads hold the only strong senders, so the channel closes when they end.
    output: Option<broadcast::WeakSender<(Stream, bytes::Bytes)>>,
    stdin: Option<StdinPipe>,
}

impl Streams {
    fn entries(&self) -> std::sync::MutexGuard<'_, HashMap<String, Entry>> {
        self.inner.lock().unwrap_or_else(|e| e.into_inner())
    }

    /// A new output channel for container `id`'s run; the copy threads hold the sender.
    pub(crate) fn output_channel(&self, id: &str) -> Tee {
        let (tx, _) = broadcast::channel(OUTPUT_BACKLOG);
        self.entries().entry(id.to_string()).or_default().output = Some(tx.downgrade());
        tx
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

    fn subscribe(&self, id: &str) -> Option<broadcast::Receiver<(Stream, bytes::Bytes)>> {
        let entries = self.entries();
        Some(entries.get(id)?.output.as_ref()?.upgrade()?.subscribe())
    }

    fn stdin(&self, id: &str) -> Option<StdinPipe> {
        self.entries().get(id)?.stdin.clone()
    }

    /// Serves one attached client of the running container `id` (`name` for messages) until
    /// its output ends, the client stops reading, or (with only stdin attached) the client's
    /// stdin ends. `stdin_enabled`/`stdin_once` are the container's `stdin`/`stdinOnce`.
    pub(crate) async fn attach(
        &self,
        client: &Client,
        id: &str,
        name: &str,
        stdin_enabled: bool,
        stdin_once: bool,
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
        let ended_or_output = self.subscribe(id).ok_or_else(|| {
            ProviderError::Exec(format!("container {name} has ended: nothing to attach to"))
        })?;
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
                () = copy_output(ended_or_output, stdout, stderr) => {}
                () = input => {}
            }
        } else {
            tokio::select! {
                () = input => {}
                () = copy_output(ended_or_output, None, None) => {}
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

/// Writes the container's output to the client until the output ends (the channel closes after
/// the last chunk) or a writer fails (the client went away).
async fn copy_output(
    mut rx: broadcast::Receiver<(Stream, bytes::Bytes)>,
    mut stdout: Option<Pin<Box<dyn AsyncWrite + Send>>>,
    mut stderr: Option<Pin<Box<dyn AsyncWrite + Send>>>,
) {
    loop {
        let (stream, bytes) = match rx.recv().await {
            Ok(chunk) => chunk,
            Err(broadcast::error::RecvError::Lagged(missed)) => {
                tracing::debug!(missed, "attached client fell behind; output dropped");
                continue;
            }
            Err(broadcast::error::RecvError::Closed) => break,
        };
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
    for writer in [stdout.as_mut(), stderr.as_mut()].into_iter().flatten() {
        let _ = writer.shutdown().await;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_from_now_on_until_the_copies_end() {
        let streams = Streams::default();
        let tee = streams.output_channel("c");
        let _ = tee.send((Stream::Stdout, bytes::Bytes::from_static(b"before\n")));
        let rx = streams.subscribe("c").unwrap();
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        let (err_w, mut err_r) = tokio::io::duplex(1024);
        let _ = tee.send((Stream::Stdout, bytes::Bytes::from_static(b"after\n")));
        let _ = tee.send((Stream::Stderr, bytes::Bytes::from_static(b"oops\n")));
        drop(tee);
        assert!(
            streams.subscribe("c").is_none(),
            "ended output cannot be attached to"
        );
        copy_output(rx, Some(Box::pin(out_w)), Some(Box::pin(err_w))).await;
        let (mut out, mut err) = (String::new(), String::new());
        out_r.read_to_string(&mut out).await.unwrap();
        err_r.read_to_string(&mut err).await.unwrap();
        assert_eq!((out.as_str(), err.as_str()), ("after\n", "oops\n"));
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
