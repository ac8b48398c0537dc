//! Container log files in the CRI format the kubelet reads (`kubectl logs`), for every
//! provider: the Wasm provider feeds [`LogFile`] from its guests' WASI streams, the containerd
//! provider from the FIFOs containerd's shim writes a task's output to.
//!
//! Each entry is `<RFC3339Nano UTC> stdout|stderr F|P <content>\n`: `F` ends a line, `P` is a
//! piece of a line that was too long ([`MAX_LINE`]) or not yet terminated when the stream
//! ended. The file is rotated as the kubelet does (`<path>.<YYYYMMDD-hhmmss>` past
//! [`MAX_LOG_SIZE`]), keeping [`MAX_LOG_FILES`]. Start at [`LogFile::open`].

use std::fs::{File, OpenOptions};
use std::io::{self, Write};
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// The longest line written as one entry; longer ones are split into `P` entries. 16 KiB is
/// containerd's `max_container_log_line_size` default, which the kubelet's log reader expects.
pub const MAX_LINE: usize = 16 * 1024;
/// The kubelet's `containerLogMaxSize` default (10Mi).
pub const MAX_LOG_SIZE: u64 = 10 * 1024 * 1024;
/// The kubelet's `containerLogMaxFiles` default: the live file plus 4 rotated ones.
pub const MAX_LOG_FILES: usize = 5;

/// Which stream an entry came from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Stream {
    Stdout = 0,
    Stderr = 1,
}

impl Stream {
    pub fn as_str(self) -> &'static str {
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

/// Now as RFC 3339 in UTC with nanoseconds, trailing zeros trimmed (Go's `time.RFC3339Nano`).
pub fn timestamp_now() -> String {
    jiff::Timestamp::now().to_string()
}

/// The log file of one container run, written by its stdout and stderr. Not synchronised:
/// a provider shares it behind its own lock.
pub struct LogFile {
    path: PathBuf,
    file: File,
    size: u64,
    max_size: u64,
    max_files: usize,
    /// Unterminated output per stream (stdout, stderr).
    pending: [Vec<u8>; 2],
    /// Set after the first write failure, so a full disk is logged once, not per line.
    failed: bool,
}

impl LogFile {
    /// Opens (appending to) the log at `path` with the kubelet's rotation defaults.
    pub fn open(path: &Path) -> io::Result<Self> {
        Self::open_with(path, MAX_LOG_SIZE, MAX_LOG_FILES)
    }

    /// Opens the log with explicit rotation limits.
    pub fn open_with(path: &Path, max_size: u64, max_files: usize) -> io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        let file = open_log(path)?;
        let size = file.metadata()?.len();
        Ok(LogFile {
            path: path.to_path_buf(),
            file,
            size,
            max_size,
            max_files: max_files.max(1),
            pending: [Vec::new(), Vec::new()],
            failed: false,
        })
    }

    /// Writes container output; complete lines go out at once, the rest waits for its newline.
    pub fn write(&mut self, stream: Stream, bytes: &[u8]) {
        let entries = split_entries(&mut self.pending[stream as usize], bytes, MAX_LINE);
        self.write_entries(stream, entries);
    }

    /// Writes what is left unterminated on `stream` as a `P` entry (its writer closed).
    pub fn finish(&mut self, stream: Stream) {
        let rest = std::mem::take(&mut self.pending[stream as usize]);
        if !rest.is_empty() {
            self.write_entries(stream, vec![(Tag::Partial, rest)]);
        }
        let _ = self.file.flush();
    }

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
        self.file = open_log(&self.path)?;
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

/// Opens a log for appending, creating it; a symlink in its place is refused (`ELOOP`), so a
/// log is never written through a link someone else put there.
fn open_log(path: &Path) -> io::Result<File> {
    OpenOptions::new()
        .create(true)
        .append(true)
        .custom_flags(libc::O_NOFOLLOW)
        .open(path)
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;

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

    proptest! {
        /// However the output is cut into writes, the entries put back together (a newline
        /// after each `F`) plus what is pending are exactly the output, no entry is longer
        /// than the limit, and none holds a newline.
        #[test]
        fn entries_reassemble_the_output(
            output in proptest::collection::vec(prop_oneof![Just(b'\n'), any::<u8>()], 0..400),
            cuts in proptest::collection::vec(0usize..400, 0..8),
            max in 1usize..40,
        ) {
            let mut cuts: Vec<usize> = cuts.into_iter().map(|c| c.min(output.len())).collect();
            cuts.push(0);
            cuts.push(output.len());
            cuts.sort();
            let mut pending = Vec::new();
            let mut rebuilt = Vec::new();
            for w in cuts.windows(2) {
                for (tag, content) in split_entries(&mut pending, &output[w[0]..w[1]], max) {
                    prop_assert!(content.len() <= max);
                    prop_assert!(!content.contains(&b'\n'));
                    rebuilt.extend_from_slice(&content);
                    if tag == Tag::Full {
                        rebuilt.push(b'\n');
                    }
                }
            }
            prop_assert!(pending.len() <= max);
            rebuilt.extend_from_slice(&pending);
            prop_assert_eq!(rebuilt, output);
        }
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
        let dir = std::env::temp_dir().join(format!("wk-crilog-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn writes_full_and_final_partial_entries() {
        let dir = temp_dir("write");
        let path = dir.join("c/0.log");
        let mut log = LogFile::open(&path).unwrap();
        log.write(Stream::Stdout, b"hello\nwor");
        log.write(Stream::Stderr, b"oops\n");
        log.write(Stream::Stdout, b"ld");
        log.finish(Stream::Stdout);
        log.finish(Stream::Stderr);
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(
            lines,
            vec!["stdout F hello", "stderr F oops", "stdout P world"]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_log_is_never_written_through_a_symlink() {
        let dir = temp_dir("symlink");
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"untouched").unwrap();
        let path = dir.join("0.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        assert!(LogFile::open(&path).is_err());
        std::fs::remove_file(&path).unwrap();
        // Swapped in after the open: writes go to the open file, and the rotation moves the
        // link away and starts a new file (its reopen refuses a link put back in between).
        let mut log = LogFile::open_with(&path, 40, 3).unwrap();
        log.write(Stream::Stdout, b"0123456789012345678901234567890\n");
        std::fs::remove_file(&path).unwrap();
        std::os::unix::fs::symlink(&target, &path).unwrap();
        log.write(Stream::Stdout, b"0123456789012345678901234567890\n");
        assert_eq!(std::fs::read(&target).unwrap(), b"untouched");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn rotates_and_keeps_a_bounded_number_of_files() {
        let dir = temp_dir("rotate");
        let path = dir.join("0.log");
        let mut log = LogFile::open_with(&path, 100, 3).unwrap();
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
