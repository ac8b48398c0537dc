//! Container log files in the CRI format the kubelet reads (`kubectl logs`), fed from the
//! FIFOs containerd's shim writes a task's stdout and stderr to.
//!
//! The entry format and rotation are those of the Wasm provider's `log` module
//! (providers/wasmtime/src/log.rs): `<RFC3339Nano UTC> stdout|stderr F|P <content>\n`, lines
//! longer than [`MAX_LINE`] split into `P` entries, the file rotated to
//! `<path>.<YYYYMMDD-hhmmss>` past [`MAX_LOG_SIZE`] keeping [`MAX_LOG_FILES`]. It is a copy, not
//! a shared module, because this crate may not change the Wasm provider; moving both onto one
//! module in provider-api is a follow-up.

use std::fs::{File, OpenOptions};
use std::io::{self, Read, Write};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

/// The longest line written as one entry (containerd's `max_container_log_line_size`).
pub const MAX_LINE: usize = 16 * 1024;
/// The kubelet's `containerLogMaxSize` default (10Mi).
pub const MAX_LOG_SIZE: u64 = 10 * 1024 * 1024;
/// The kubelet's `containerLogMaxFiles` default: the live file plus 4 rotated ones.
pub const MAX_LOG_FILES: usize = 5;

/// Where a container's output goes besides its log: the clients attached to it.
pub type Tee = tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>;

/// Which stream an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Moves the complete entries out of `pending` (which `input` is appended to): `(true, line)`
/// for a line ended by a newline, `(false, piece)` for a `max_line` piece of a longer one.
fn split_entries(pending: &mut Vec<u8>, input: &[u8], max_line: usize) -> Vec<(bool, Vec<u8>)> {
    pending.extend_from_slice(input);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let rest = &pending[start..];
        let window = &rest[..rest.len().min(max_line + 1)];
        if let Some(pos) = window.iter().position(|&b| b == b'\n') {
            out.push((true, rest[..pos].to_vec()));
            start += pos + 1;
        } else if rest.len() > max_line {
            out.push((false, rest[..max_line].to_vec()));
            start += max_line;
        } else {
            break;
        }
    }
    pending.drain(..start);
    out
}

/// The log file of one container run, shared by its stdout and stderr readers.
#[derive(Clone)]
pub struct ContainerLog {
    inner: Arc<Mutex<LogFile>>,
}

struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: usize,
    pending: [Vec<u8>; 2],
    failed: bool,
}

impl ContainerLog {
    /// Opens (appending to) the log at `path` with the kubelet's rotation defaults.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, MAX_LOG_SIZE, MAX_LOG_FILES)
    }

    /// Opens the log with explicit rotation limits.
    pub fn open_with(path: &Path, max_size: u64, max_files: usize) -> io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = OpenOptions::new().create(true).append(true).open(path)?;
        let size = file.metadata()?.len();
        Ok(Self {
            inner: Arc::new(Mutex::new(LogFile {
                path: path.to_path_buf(),
                file,
                size,
                max_size,
                max_files: max_files.max(1),
                pending: [Vec::new(), Vec::new()],
                failed: false,
            })),
        })
    }

    /// Writes container output; complete lines go out at once, the rest waits for its newline.
    pub fn write(&self, stream: Stream, bytes: &[u8]) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let entries = split_entries(&mut inner.pending[stream as usize], bytes, MAX_LINE);
        inner.write_entries(stream, entries);
    }

    /// Writes what is left unterminated on `stream` as a `P` entry (its writer closed).
    pub fn finish(&self, stream: Stream) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        let rest = std::mem::take(&mut inner.pending[stream as usize]);
        if !rest.is_empty() {
            inner.write_entries(stream, vec![(false, rest)]);
        }
        let _ = inner.file.flush();
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

impl LogFile {
    fn write_entries(&mut self, stream: Stream, entries: Vec<(bool, Vec<u8>)>) {
        if entries.is_empty() {
            return;
        }
        let timestamp = jiff::Timestamp::now().to_string();
        for (full, content) in entries {
            let mut line = Vec::with_capacity(timestamp.len() + content.len() + 12);
            line.extend_from_slice(timestamp.as_bytes());
            line.push(b' ');
            line.extend_from_slice(stream.as_str().as_bytes());
            line.extend_from_slice(if full { b" F " } else { b" P " });
            line.extend_from_slice(&content);
            line.push(b'\n');
            if let Err(e) = self.write_line(&line) {
                if !self.failed {
                    tracing::warn!(path = %self.path.display(), error = %e, "cannot write container log; dropping output");
                    self.failed = true;
                }
            }
        }
    }

    fn write_line(&mut self, line: &[u8]) -> io::Result<()> {
        if self.size > 0 && self.size + line.len() as u64 > self.max_size {
            self.rotate()?;
        }
        self.file.write_all(line)?;
        self.size += line.len() as u64;
        Ok(())
    }

    fn rotate(&mut self) -> io::Result<()> {
        let stamp = jiff::Timestamp::now().strftime("%Y%m%d-%H%M%S").to_string();
        let mut target = suffixed(&self.path, &stamp);
        let mut n = 1;
        while target.exists() {
            target = suffixed(&self.path, &format!("{stamp}-{n}"));
            n += 1;
        }
        std::fs::rename(&self.path, &target)?;
        self.file = OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)?;
        self.size = 0;
        let (Some(dir), Some(name)) = (
            self.path.parent(),
            self.path.file_name().and_then(|n| n.to_str()),
        ) else {
            return Ok(());
        };
        let prefix = format!("{name}.");
        let mut rotated = Vec::new();
        for entry in std::fs::read_dir(dir)? {
            let entry = entry?;
            if entry
                .file_name()
                .to_str()
                .is_some_and(|n| n.starts_with(&prefix))
            {
                rotated.push(entry.path());
            }
        }
        rotated.sort();
        let excess = rotated.len().saturating_sub(self.max_files - 1);
        for old in rotated.into_iter().take(excess) {
            std::fs::remove_file(&old)?;
        }
        Ok(())
    }
}

fn suffixed(path: &Path, suffix: &str) -> PathBuf {
    let mut name = path.as_os_str().to_os_string();
    name.push(".");
    name.push(suffix);
    PathBuf::from(name)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn writes_full_and_final_partial_entries_and_rotates() {
        let dir = std::env::temp_dir().join(format!("ctd-log-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        let path = dir.join("c/0.log");
        let log = ContainerLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"hello\nwor");
        log.write(Stream::Stderr, b"oops\n");
        log.write(Stream::Stdout, b"ld");
        log.finish(Stream::Stdout);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            lines,
            vec!["stdout F hello", "stderr F oops", "stdout P world"]
        );
        let small = ContainerLog::open_with(&dir.join("r.log"), 100, 3).unwrap();
        for i in 0..40 {
            small.write(Stream::Stdout, format!("line number {i:03}\n").as_bytes());
        }
        let rotated = std::fs::read_dir(&dir)
            .unwrap()
            .filter(|e| {
                e.as_ref()
                    .unwrap()
                    .file_name()
                    .to_string_lossy()
                    .starts_with("r.log")
            })
            .count();
        assert_eq!(rotated, 3);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn long_lines_become_partial_entries() {
        let mut pending = Vec::new();
        let out = split_entries(&mut pending, b"abcde\n0123456789", 4);
        assert_eq!(
            out,
            vec![
                (false, b"abcd".to_vec()),
                (true, b"e".to_vec()),
                (false, b"0123".to_vec()),
                (false, b"4567".to_vec())
            ]
        );
        assert_eq!(pending, b"89");
    }
}
