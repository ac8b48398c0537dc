//! A container's log: the CRI log file ([`provider_api::cri_log`], shared with the Wasm
//! provider) fed from a task's stdout and stderr, either by the log driver the shim runs
//! ([`crate::log_driver`]) or by the agent's own readers of the task's FIFOs; and
//! [`LogFollower`], which reads the entries appended to it (attached clients).

use std::fs::File;
use std::io::{self, Read, Seek};
use std::os::unix::fs::{MetadataExt, OpenOptionsExt};
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};

use provider_api::cri_log::LogFile;
pub use provider_api::cri_log::Stream;

/// The log file of one container run, shared by its stdout and stderr readers.
#[derive(Clone)]
pub struct ContainerLog {
    inner: Arc<Mutex<LogFile>>,
}

impl ContainerLog {
    /// Opens (appending to) the log at `path` with the kubelet's rotation defaults. A symbolic
    /// link as the file itself is refused (ELOOP): the log is written where the node named it.
    pub fn open(path: &Path) -> io::Result<Self> {
        if let Some(parent) = path.parent() {
            std::fs::create_dir_all(parent)?;
        }
        std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .custom_flags(libc::O_NOFOLLOW)
            .open(path)?;
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

    /// Copies `source` (a pipe or FIFO) into the log until it ends (every writer closed it);
    /// blocking, for a thread of its own.
    pub fn copy_from(&self, stream: Stream, mut source: File) {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            match source.read(&mut buf) {
                Ok(0) => break,
                Ok(n) => self.write(stream, &buf[..n]),
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

/// Reads the entries appended to a CRI log file from some point on, following it across
/// rotation (the file at the path being replaced by a new one), and gives them back as the
/// output they were made from: a `F` entry's content and its newline, a `P` entry's content.
pub struct LogFollower {
    path: PathBuf,
    /// The file being read and its inode; `None` until the log exists.
    file: Option<(File, u64)>,
    /// An entry not yet whole (the writer's `write` may be seen half done).
    pending: Vec<u8>,
}

impl LogFollower {
    /// Follows the log at `path` from its current end (what is there already is not given).
    pub fn at_end(path: &Path) -> Self {
        let file = File::open(path).ok().and_then(|mut f| {
            f.seek(io::SeekFrom::End(0)).ok()?;
            let ino = f.metadata().ok()?.ino();
            Some((f, ino))
        });
        LogFollower {
            path: path.to_path_buf(),
            file,
            pending: Vec::new(),
        }
    }

    /// The output of the entries appended since the last call, in order, by stream.
    pub fn read_new(&mut self) -> Vec<(Stream, Vec<u8>)> {
        let mut out = Vec::new();
        loop {
            if let Some((file, _)) = &mut self.file {
                let mut buf = Vec::new();
                if file.read_to_end(&mut buf).is_ok() {
                    self.pending.extend_from_slice(&buf);
                }
                let mut start = 0;
                while let Some(pos) = self.pending[start..].iter().position(|&b| b == b'\n') {
                    if let Some(entry) = parse_entry(&self.pending[start..start + pos]) {
                        out.push(entry);
                    }
                    start += pos + 1;
                }
                self.pending.drain(..start);
            }
            // Rotated (or created): the path names another file; the old one is read to its
            // end above, the new one from its start.
            let current = self.file.as_ref().map(|(_, ino)| *ino);
            match std::fs::metadata(&self.path) {
                Ok(meta) if Some(meta.ino()) != current => match File::open(&self.path) {
                    Ok(file) => {
                        let ino = file.metadata().map_or(meta.ino(), |m| m.ino());
                        self.file = Some((file, ino));
                        self.pending.clear();
                    }
                    Err(_) => break,
                },
                _ => break,
            }
        }
        out
    }
}

/// `<timestamp> <stream> <F|P> <content>` (without the newline) as (stream, output).
fn parse_entry(line: &[u8]) -> Option<(Stream, Vec<u8>)> {
    let mut parts = line.splitn(4, |&b| b == b' ');
    let _timestamp = parts.next()?;
    let stream = match parts.next()? {
        b"stdout" => Stream::Stdout,
        b"stderr" => Stream::Stderr,
        _ => return None,
    };
    let tag = parts.next()?;
    let mut content = parts.next().unwrap_or_default().to_vec();
    match tag {
        b"F" => content.push(b'\n'),
        b"P" => {}
        _ => return None,
    }
    Some((stream, content))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn temp_dir(name: &str) -> PathBuf {
        let dir = std::env::temp_dir().join(format!("ctd-log-{name}-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        dir
    }

    #[test]
    fn copies_a_pipe_into_the_log() {
        let dir = temp_dir("copy");
        let source = dir.join("out");
        std::fs::write(&source, b"hello\nwor").unwrap();
        let path = dir.join("c/0.log");
        let log = ContainerLog::open(&path).unwrap();
        log.copy_from(Stream::Stdout, File::open(&source).unwrap());
        let text = std::fs::read_to_string(&path).unwrap();
        let lines: Vec<&str> = text.lines().map(|l| l.split_once(' ').unwrap().1).collect();
        assert_eq!(lines, vec!["stdout F hello", "stdout P wor"]);
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn a_symlink_as_the_log_is_refused() {
        let dir = temp_dir("symlink");
        let target = dir.join("elsewhere");
        std::fs::write(&target, b"").unwrap();
        let path = dir.join("0.log");
        std::os::unix::fs::symlink(&target, &path).unwrap();
        let err = ContainerLog::open(&path).err().expect("refused");
        assert_eq!(err.raw_os_error(), Some(libc::ELOOP), "{err}");
        assert_eq!(
            std::fs::read(&target).unwrap(),
            b"",
            "nothing written through it"
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn follows_new_entries_across_rotation() {
        let dir = temp_dir("follow");
        let path = dir.join("0.log");
        let log = ContainerLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"before\n");
        let mut follower = LogFollower::at_end(&path);
        assert!(
            follower.read_new().is_empty(),
            "what was there is not given"
        );
        log.write(Stream::Stdout, b"out 1\n");
        log.write(Stream::Stderr, b"err 1\n");
        // A half-written entry waits for its end.
        let mut raw = std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap();
        io::Write::write_all(&mut raw, b"2026-01-01T00:00:00Z stdout F ha").unwrap();
        assert_eq!(
            follower.read_new(),
            vec![
                (Stream::Stdout, b"out 1\n".to_vec()),
                (Stream::Stderr, b"err 1\n".to_vec())
            ]
        );
        io::Write::write_all(&mut raw, b"lf\n2026-01-01T00:00:00Z stdout P no newline\n").unwrap();
        // Rotated: the old file renamed, a new one at the path.
        std::fs::rename(&path, dir.join("0.log.1")).unwrap();
        let log = ContainerLog::open(&path).unwrap();
        log.write(Stream::Stdout, b"after rotation\n");
        assert_eq!(
            follower.read_new(),
            vec![
                (Stream::Stdout, b"half\n".to_vec()),
                (Stream::Stdout, b"no newline".to_vec()),
                (Stream::Stdout, b"after rotation\n".to_vec())
            ]
        );
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
