//! A Wasm container's log: the CRI log file ([`provider_api::cri_log`], shared with the
//! containerd provider) plus the live copy `kubectl attach` reads.
//!
//! Start at [`ContainerLog`]; [`ContainerLog::pipe`] gives the WASI stdout/stderr stream.

use std::io;
use std::path::Path;
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use provider_api::cri_log::LogFile;
pub use provider_api::cri_log::Stream;
use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// Writes an attached reader may fall behind by before it loses the oldest: a guest writes a
/// line or a buffer at a time, so 1024 writes is far more than a reader on a live connection
/// lags, and bounds what a stalled one holds.
pub const ATTACH_BACKLOG: usize = 1024;

/// The log file of one container run, shared by its stdout and stderr.
#[derive(Clone)]
pub struct ContainerLog {
    inner: Arc<Mutex<Inner>>,
}

struct Inner {
    file: LogFile,
    /// Attached readers (`kubectl attach`): every write also goes here as written.
    attached: Option<tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>>,
    /// Set by [`ContainerLog::finish`]: the run is over, nothing more will be written.
    finished: bool,
}

impl ContainerLog {
    /// Opens (appending to) the log at `path` with the kubelet's rotation defaults.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(Inner {
                file: LogFile::open(path)?,
                attached: None,
                finished: false,
            })),
        })
    }

    /// The WASI stream writing `stream`'s entries to this log.
    pub fn pipe(&self, stream: Stream) -> LogPipe {
        LogPipe {
            log: self.clone(),
            stream,
        }
    }

    /// A live copy of everything written from now on, as written, for `kubectl attach`; the
    /// receiver sees the channel close when the run ends. `None` when it has ended already.
    /// A reader more than [`ATTACH_BACKLOG`] writes behind loses the oldest (it is told so by
    /// `RecvError::Lagged`); the log file never waits for a reader.
    pub fn subscribe(&self) -> Option<tokio::sync::broadcast::Receiver<(Stream, bytes::Bytes)>> {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if inner.finished {
            return None;
        }
        Some(
            inner
                .attached
                .get_or_insert_with(|| tokio::sync::broadcast::channel(ATTACH_BACKLOG).0)
                .subscribe(),
        )
    }

    /// Writes guest output; complete lines go out at once, the rest waits for its newline.
    pub fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        if let Some(attached) = &inner.attached {
            if attached
                .send((stream, bytes::Bytes::copy_from_slice(bytes)))
                .is_err()
            {
                // Every reader went away.
                inner.attached = None;
            }
        }
        inner.file.write(stream, bytes);
    }

    /// Writes what is left unterminated on both streams as `P` entries; called when the run ends.
    pub fn finish(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.finished = true;
        // Dropping the sender ends every attached reader once it has read what was written.
        inner.attached = None;
        inner.file.finish(Stream::Stdout);
        inner.file.finish(Stream::Stderr);
    }
}

/// A container's stdout or stderr as WASI sees it: never a terminal, always ready, every write
/// goes to the log file.
#[derive(Clone)]
pub struct LogPipe {
    log: ContainerLog,
    stream: Stream,
}

impl IsTerminal for LogPipe {
    fn is_terminal(&self) -> bool {
        false
    }
}

impl StdoutStream for LogPipe {
    fn async_stream(&self) -> Box<dyn tokio::io::AsyncWrite + Send + Sync> {
        Box::new(self.clone())
    }
    fn p2_stream(&self) -> Box<dyn OutputStream> {
        Box::new(self.clone())
    }
}

#[async_trait::async_trait]
impl Pollable for LogPipe {
    async fn ready(&mut self) {}
}

impl OutputStream for LogPipe {
    fn write(&mut self, bytes: bytes::Bytes) -> Result<(), StreamError> {
        self.log.write(self.stream, &bytes);
        Ok(())
    }
    fn flush(&mut self) -> Result<(), StreamError> {
        Ok(())
    }
    fn check_write(&mut self) -> Result<usize, StreamError> {
        // How much the guest may hand over in one write; any size works, this bounds a copy.
        Ok(64 * 1024)
    }
}

impl tokio::io::AsyncWrite for LogPipe {
    fn poll_write(
        self: Pin<&mut Self>,
        _cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<io::Result<usize>> {
        self.log.write(self.stream, buf);
        Poll::Ready(Ok(buf.len()))
    }
    fn poll_flush(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
    fn poll_shutdown(self: Pin<&mut Self>, _cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Poll::Ready(Ok(()))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn an_attached_reader_sees_writes_and_the_end_of_the_run() {
        let dir = std::env::temp_dir().join(format!("wk-log-attach-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("c/0.log");
        let log = ContainerLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"before\n");
        let mut reader = log.subscribe().expect("the run is live");
        log.write(Stream::Stderr, b"oops\nhalf");
        log.finish();
        let (stream, bytes) = reader.try_recv().unwrap();
        assert_eq!((stream, &bytes[..]), (Stream::Stderr, &b"oops\nhalf"[..]));
        assert!(reader.try_recv().is_err(), "closed after the run");
        assert!(
            log.subscribe().is_none(),
            "nothing to attach to after the run"
        );
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            lines,
            vec!["stdout F before", "stderr F oops", "stderr P half"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
