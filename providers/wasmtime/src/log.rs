//! Container log files in the CRI format the kubelet reads (`kubectl logs`).
//!
//! Each entry is `<RFC3339Nano UTC> stdout|stderr F|P <content>\n`: `F` ends a line, `P` is a
//! piece of a line that was too long or not yet terminated when the container ended. The file is
//! rotated like the kubelet does (`<path>.<YYYYMMDD-hhmmss>`), keeping a bounded number of files.
//!
//! Start at [`ContainerLog`]; [`ContainerLog::pipe`] gives the WASI stdout/stderr stream.

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::path::{Path, PathBuf};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};

use wasmtime_wasi::cli::{IsTerminal, StdoutStream};
use wasmtime_wasi::p2::{OutputStream, Pollable, StreamError};

/// The longest line written as one entry; longer ones are split into `P` entries. 16 KiB is
/// containerd's `max_container_log_line_size` default, which the kubelet's log reader expects.
pub const MAX_LINE: usize = 16 * 1024;
/// The kubelet's `containerLogMaxSize` default (10Mi).
pub const MAX_LOG_SIZE: u64 = 10 * 1024 * 1024;
/// Writes an attached reader may fall behind by before it loses the oldest: a guest writes a
/// line or a buffer at a time, so 1024 writes is far more than a reader on a live connection
/// lags, and bounds what a stalled one holds.
pub const ATTACH_BACKLOG: usize = 1024;
/// The kubelet's `containerLogMaxFiles` default: the live file plus 4 rotated ones.
pub const MAX_LOG_FILES: usize = 5;

/// Which stream an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout,
    Stderr,
}

impl Stream {
    fn as_str(self) -> &'static str {
        match self {
            Stream::Stdout => "stdout",
            Stream::Stderr => "stderr",
        }
    }
}

/// Whether an entry ends its line (`F`) or is a piece of one (`P`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Tag {
    Full,
    Partial,
}

/// Moves the complete entries out of `pending` (which `input` is appended to): every line up to
/// a newline (without it) as `Full`, and pieces of `max_line` bytes of a longer line as
/// `Partial`. What stays in `pending` is an unterminated line of at most `max_line` bytes.
pub fn split_entries(pending: &mut Vec<u8>, input: &[u8], max_line: usize) -> Vec<(Tag, Vec<u8>)> {
    pending.extend_from_slice(input);
    let mut out = Vec::new();
    let mut start = 0;
    loop {
        let rest = &pending[start..];
        let window = &rest[..rest.len().min(max_line + 1)];
        if let Some(pos) = window.iter().position(|&b| b == b'\n') {
            out.push((Tag::Full, rest[..pos].to_vec()));
            start += pos + 1;
        } else if rest.len() > max_line {
            out.push((Tag::Partial, rest[..max_line].to_vec()));
            start += max_line;
        } else {
            break;
        }
    }
    pending.drain(..start);
    out
}

/// One CRI log line for `content` (which holds no newline).
pub fn format_entry(timestamp: &str, stream: Stream, tag: Tag, content: &[u8]) -> Vec<u8> {
    let tag = match tag {
        Tag::Full => "F",
        Tag::Partial => "P",
    };
    let mut line = Vec::with_capacity(timestamp.len() + content.len() + 12);
    line.extend_from_slice(timestamp.as_bytes());
    line.push(b' ');
    line.extend_from_slice(stream.as_str().as_bytes());
    line.push(b' ');
    line.extend_from_slice(tag.as_bytes());
    line.push(b' ');
    line.extend_from_slice(content);
    line.push(b'\n');
    line
}

/// The log file of one container run, shared by its stdout and stderr.
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
    /// Unterminated output per stream (stdout, stderr).
    pending: [Vec<u8>; 2],
    /// Set after the first write failure, so a full disk is logged once, not per line.
    failed: bool,
    /// Attached readers (`kubectl attach`): every write also goes here as written.
    attached: Option<tokio::sync::broadcast::Sender<(Stream, bytes::Bytes)>>,
    /// Set by [`ContainerLog::finish`]: the run is over, nothing more will be written.
    finished: bool,
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
        let inner = LogFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size,
            max_files: max_files.max(1),
            pending: [Vec::new(), Vec::new()],
            failed: false,
            attached: None,
            finished: false,
        };
        Ok(Self {
            inner: Arc::new(Mutex::new(inner)),
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
        let idx = stream as usize;
        let entries = split_entries(&mut inner.pending[idx], bytes, MAX_LINE);
        inner.write_entries(stream, entries);
    }

    /// Writes what is left unterminated on both streams as `P` entries; called when the run ends.
    pub fn finish(&self) {
        let mut inner = self.inner.lock().unwrap_or_else(|e| e.into_inner());
        inner.finished = true;
        // Dropping the sender ends every attached reader once it has read what was written.
        inner.attached = None;
        for stream in [Stream::Stdout, Stream::Stderr] {
            let rest = std::mem::take(&mut inner.pending[stream as usize]);
            if !rest.is_empty() {
                inner.write_entries(stream, vec![(Tag::Partial, rest)]);
            }
        }
        let _ = inner.file.flush();
    }
}

impl LogFile {
    fn write_entries(&mut self, stream: Stream, entries: Vec<(Tag, Vec<u8>)>) {
        if entries.is_empty() {
            return;
        }
        let timestamp = timestamp_now();
        for (tag, content) in entries {
            let line = format_entry(&timestamp, stream, tag, &content);
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

    /// Renames the live file to `<path>.<timestamp>`, starts a new one and deletes the oldest
    /// rotated files beyond `max_files - 1`.
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
        let mut rotated = rotated_files(&self.path)?;
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

/// The rotated siblings of `path` (`<name>.<something>`).
fn rotated_files(path: &Path) -> io::Result<Vec<PathBuf>> {
    let (Some(dir), Some(name)) = (path.parent(), path.file_name().and_then(|n| n.to_str())) else {
        return Ok(Vec::new());
    };
    let prefix = format!("{name}.");
    let mut found = Vec::new();
    for entry in std::fs::read_dir(dir)? {
        let entry = entry?;
        if entry
            .file_name()
            .to_str()
            .is_some_and(|n| n.starts_with(&prefix))
        {
            found.push(entry.path());
        }
    }
    Ok(found)
}

/// Now as RFC 3339 in UTC with nanoseconds, trailing zeros trimmed (Go's `time.RFC3339Nano`).
pub fn timestamp_now() -> String {
    jiff::Timestamp::now().to_string()
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

    fn split(pending: &mut Vec<u8>, input: &str, max: usize) -> Vec<(Tag, String)> {
        split_entries(pending, input.as_bytes(), max)
            .into_iter()
            .map(|(t, c)| (t, String::from_utf8(c).unwrap()))
            .collect()
    }

    #[test]
    fn splits_lines_and_keeps_the_unterminated_rest() {
        let mut pending = Vec::new();
        assert_eq!(
            split(&mut pending, "a\nbc\nde", 8),
            vec![(Tag::Full, "a".into()), (Tag::Full, "bc".into())]
        );
        assert_eq!(pending, b"de");
        assert_eq!(
            split(&mut pending, "f\n", 8),
            vec![(Tag::Full, "def".into())]
        );
        assert!(pending.is_empty());
        assert_eq!(split(&mut pending, "\n", 8), vec![(Tag::Full, "".into())]);
    }

    #[test]
    fn long_lines_become_partial_entries() {
        let mut pending = Vec::new();
        // Exactly max bytes then a newline is one full line.
        assert_eq!(
            split(&mut pending, "abcd\n", 4),
            vec![(Tag::Full, "abcd".into())]
        );
        // A line one byte too long: a P piece then the F rest.
        assert_eq!(
            split(&mut pending, "abcde\n", 4),
            vec![(Tag::Partial, "abcd".into()), (Tag::Full, "e".into())]
        );
        // A long unterminated run: pieces out, at most max bytes held back.
        assert_eq!(
            split(&mut pending, "0123456789", 4),
            vec![(Tag::Partial, "0123".into()), (Tag::Partial, "4567".into())]
        );
        assert_eq!(pending, b"89");
    }

    #[test]
    fn entries_have_the_cri_shape() {
        let line = format_entry(
            "2025-01-02T03:04:05.123456789Z",
            Stream::Stderr,
            Tag::Partial,
            b"hi",
        );
        assert_eq!(line, b"2025-01-02T03:04:05.123456789Z stderr P hi\n");
        let ts = timestamp_now();
        assert!(ts.ends_with('Z') && ts.contains('T'), "{ts}");
        assert!(ts.parse::<jiff::Timestamp>().is_ok(), "{ts}");
    }

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("wk-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn writes_full_and_final_partial_entries() {
        let dir = temp_dir("write");
        let path = dir.join("c/0.log");
        let log = ContainerLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"hello\nwor");
        log.write(Stream::Stderr, b"oops\n");
        log.write(Stream::Stdout, b"ld");
        log.finish();
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            lines,
            vec!["stdout F hello", "stderr F oops", "stdout P world"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotates_and_keeps_a_bounded_number_of_files() {
        let dir = temp_dir("rotate");
        let path = dir.join("0.log");
        let log = ContainerLog::open_with(&path, 100, 3).unwrap();
        for i in 0..40 {
            log.write(Stream::Stdout, format!("line number {i:03}\n").as_bytes());
        }
        let names: Vec<_> = std::fs::read_dir(&dir)
            .unwrap()
            .map(|e| e.unwrap().file_name().into_string().unwrap())
            .collect();
        assert_eq!(names.len(), 3, "{names:?}");
        assert!(std::fs::metadata(&path).unwrap().len() <= 100);
        let live = std::fs::read_to_string(&path).unwrap();
        assert!(live.contains("line number 039"), "{live}");
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
