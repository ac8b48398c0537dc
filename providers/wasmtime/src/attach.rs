//! Attach: a client joins a running container's stdio (`kubectl attach`, `kubectl run -i`).
//!
//! Start at [`Attachable`], made when a container starts. Output: the container's log
//! ([`ContainerLog::subscribe`]) hands every write, as written, to attached readers besides the
//! log file, so an attached client sees output from the moment it attaches (not what was
//! written before: that is `kubectl logs`). Input: a container created with `stdin: true` reads
//! its stdin from an in-memory pipe whose write end the container holds; each attached client's
//! stdin is copied into it. With `stdinOnce: true` the pipe closes (the guest reads end of
//! file) when the first attached client closes its stdin, as the kubelet's runtimes do. Without
//! `stdin: true` the guest's stdin is empty and attaching stdin is refused.

use std::sync::Arc;

use provider_api::{AttachIo, ContainerState, ProviderError};
use tokio::io::{AsyncReadExt, AsyncWriteExt, DuplexStream};
use tokio::sync::{broadcast, watch, Mutex};
use wasmtime_wasi::cli::AsyncStdinStream;
use wasmtime_wasi::WasiCtxBuilder;

use crate::exec::Exclusive;
use crate::log::{ContainerLog, Stream};

/// Bytes of stdin the pipe holds before an attached client's writes wait for the guest to
/// read: a pipe buffer on Linux.
const STDIN_BUFFER: usize = 64 * 1024;

/// What attaching to one run of a container needs.
pub(crate) struct Attachable {
    name: String,
    log: ContainerLog,
    /// The write end of the guest's stdin; `None` inside once it is closed (stdinOnce).
    stdin: Option<Arc<Mutex<Option<DuplexStream>>>>,
    stdin_once: bool,
}

impl Attachable {
    /// Wires the guest's stdin (a pipe when `stdin`) into `wasi`.
    pub(crate) fn new(
        name: &str,
        stdin: bool,
        stdin_once: bool,
        log: &ContainerLog,
        wasi: &mut WasiCtxBuilder,
    ) -> Self {
        let stdin = stdin.then(|| {
            let (writer, reader) = tokio::io::duplex(STDIN_BUFFER);
            wasi.stdin(AsyncStdinStream::new(Exclusive(reader)));
            Arc::new(Mutex::new(Some(writer)))
        });
        Attachable {
            name: name.to_string(),
            log: log.clone(),
            stdin,
            stdin_once,
        }
    }

    /// Serves one attached client until the run ends, the client stops reading, or (with only
    /// stdin attached) the client's stdin ends. `exit` is the run's exit channel.
    pub(crate) async fn attach(
        &self,
        io: AttachIo,
        exit: watch::Receiver<Option<ContainerState>>,
    ) -> Result<(), ProviderError> {
        let AttachIo {
            stdin,
            stdout,
            stderr,
        } = io;
        if stdin.is_some() && self.stdin.is_none() {
            return Err(ProviderError::Exec(format!(
                "container {}: stdin is not enabled (the container spec has no `stdin: true`), so it cannot be attached to",
                self.name
            )));
        }
        let has_output = stdout.is_some() || stderr.is_some();
        let output = match has_output {
            true => Some(self.log.subscribe().ok_or_else(|| {
                ProviderError::Exec(format!(
                    "container {} has ended: nothing to attach to",
                    self.name
                ))
            })?),
            false => None,
        };
        let input = async {
            if let (Some(client), Some(pipe)) = (stdin, &self.stdin) {
                copy_stdin(client, pipe, self.stdin_once).await;
            }
        };
        match output {
            Some(rx) => {
                // The client's stdin ending does not end the attach: output goes on until the
                // run ends or the client goes away.
                let input = async {
                    input.await;
                    std::future::pending::<()>().await
                };
                tokio::select! {
                    () = copy_output(rx, stdout, stderr) => {}
                    () = input => {}
                }
            }
            None => {
                tokio::select! {
                    () = input => {}
                    () = ended(exit) => {}
                }
            }
        }
        Ok(())
    }
}

/// Copies the client's stdin into the guest's until either ends; closes the guest's stdin
/// afterwards when `once`.
async fn copy_stdin(
    mut client: std::pin::Pin<Box<dyn tokio::io::AsyncRead + Send>>,
    pipe: &Mutex<Option<DuplexStream>>,
    once: bool,
) {
    let mut buf = vec![0u8; 8 * 1024];
    loop {
        let n = match client.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        // Several clients may be attached: each chunk goes in whole.
        let mut guard = pipe.lock().await;
        let Some(writer) = guard.as_mut() else { return };
        if writer.write_all(&buf[..n]).await.is_err() {
            return;
        }
    }
    if once {
        // Dropping the write end is end of file for the guest.
        pipe.lock().await.take();
    }
}

/// Writes the run's output to the client until the run ends (the channel closes after the
/// last write) or a writer fails (the client went away).
async fn copy_output(
    mut rx: broadcast::Receiver<(Stream, bytes::Bytes)>,
    mut stdout: Option<std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>>,
    mut stderr: Option<std::pin::Pin<Box<dyn tokio::io::AsyncWrite + Send>>>,
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

/// Resolves when the run has published its exit (or its task is gone).
async fn ended(mut exit: watch::Receiver<Option<ContainerState>>) {
    while exit.borrow_and_update().is_none() {
        if exit.changed().await.is_err() {
            return;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn output_from_now_on_reaches_the_client_until_the_run_ends() {
        let dir = std::env::temp_dir().join(format!("wk-attach-{}", std::process::id()));
        let log = ContainerLog::open(&dir.join("0.log")).unwrap();
        log.write(Stream::Stdout, b"before attaching\n");
        let rx = log.subscribe().unwrap();
        let (out_w, mut out_r) = tokio::io::duplex(1024);
        let (err_w, mut err_r) = tokio::io::duplex(1024);
        log.write(Stream::Stdout, b"after ");
        log.write(Stream::Stderr, b"oops\n");
        log.write(Stream::Stdout, b"attaching\n");
        log.finish();
        assert!(
            log.subscribe().is_none(),
            "a finished run cannot be attached to"
        );
        copy_output(rx, Some(Box::pin(out_w)), Some(Box::pin(err_w))).await;
        let (mut out, mut err) = (String::new(), String::new());
        out_r.read_to_string(&mut out).await.unwrap();
        err_r.read_to_string(&mut err).await.unwrap();
        assert_eq!(
            (out.as_str(), err.as_str()),
            ("after attaching\n", "oops\n")
        );
        let _ = std::fs::remove_dir_all(&dir);
    }

    #[tokio::test]
    async fn stdin_once_closes_the_guest_stdin_when_the_client_ends() {
        for once in [true, false] {
            let (writer, mut guest) = tokio::io::duplex(1024);
            let pipe = Mutex::new(Some(writer));
            copy_stdin(Box::pin(&b"typed\n"[..]), &pipe, once).await;
            let mut got = vec![0u8; 6];
            guest.read_exact(&mut got).await.unwrap();
            assert_eq!(got, b"typed\n");
            assert_eq!(pipe.lock().await.is_none(), once, "stdinOnce={once}");
            if once {
                assert_eq!(
                    guest.read(&mut got).await.unwrap(),
                    0,
                    "end of file for the guest"
                );
            }
        }
    }
}
