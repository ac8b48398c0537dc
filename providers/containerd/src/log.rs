//! A container's log, fed from the FIFOs containerd's shim writes a task's stdout and stderr
//! to: the CRI log file ([`provider_api::cri_log`], shared with the Wasm provider) plus the
//! attached clients' copy ([`Tee`]).

use std::fs::File;
use std::io::{self, Read};
use std::path::Path;
use std::sync::{Arc, Mutex};

use provider_api::cri_log::LogFile;
pub use provider_api::cri_log::Stream;

/// Where a container's output goes besides its log: the clients attached to it.
pub type Tee = tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>;

/// The log file of one container run, shared by its stdout and stderr readers.
#[derive(Clone)]
pub struct ContainerLog {
    inner: Arc<Mutex<LogFile>>,
}

impl ContainerLog {
    /// Opens (appending to) the log at `path` with the kubelet's rotation defaults.
    pub fn open(path: &Path) -> io::Result<Self> {
        Ok(Self {
            inner: Arc::new(Mutex::new(LogFile::open(path)?)),
        })
    }

    /// Writes container output; complete lines go out at once, the rest waits for its newline.
    pub fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.write(stream, bytes);
    }

    /// Writes what is left unterminated on `stream` as a `P` entry (its writer closed).
    pub fn finish(&self, stream: Stream) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.finish(stream);
    }

    /// Copies `source` (a FIFO) into the log until it ends (every writer closed it), and hands
    /// each chunk, as read, to `tee` (attached clients; see [`crate::attach`]); blocking, for a
    /// thread of its own. `tee` is dropped at the end, which is how attached clients learn
    /// that the output is over.
    pub fn copy_from(&self, stream: Stream, mut source: File, tee: Option<Tee>) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => {
                    self.write(stream, &buf[..n]);
                    if let Some(tee) = &tee {
                        // An error only means no client is attached right now.
                        let _ = tee.send((stream, bytes::Bytes::copy_from_slice(&buf[..n])));
                    }
                }
                Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
                Err(e) => {
                    tracing::warn!(error = %e, stream = stream.as_str(), "reading container output failed");
                    break;
                }
            }
        }
        self.finish(stream);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn copies_a_fifo_into_the_log_and_the_tee() {
        let dir = std::env::temp_dir().join(format!("ctd-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let source = dir.join("out");
        std::fs::write(&source, b"hello\nwor").unwrap();
        let path = dir.join("c/0.log");
        let log = ContainerLog::open(&path).unwrap();
        let (tee, mut attached) = tokio::sync::broadcast::channel(4);
        log.copy_from(Stream::Stdout, File::open(&source).unwrap(), Some(tee));
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, vec!["stdout F hello", "stdout P wor"]);
        let (stream, bytes) = attached.try_recv().unwrap();
        assert_eq!((stream, &bytes[..]), (Stream::Stdout, &b"hello\nwor"[..]));
        assert!(matches!(
            attached.try_recv(),
            Err(tokio::sync::broadcast::error::TryRecvError::Closed)
        ));
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
