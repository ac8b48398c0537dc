//! The container log driver: the process that writes a container's CRI log, run by containerd's
//! shim (not by the agent), so it outlives an agent restart and no output is lost or held up
//! while no agent runs.
//!
//! containerd's `binary://` log URI (containerd 1.6 `pkg/process/io.go`, `NewBinaryIO`): when
//! a task is created with `stdout = binary://<program>?<key>=<value>`, the shim runs
//! `<program> <key> <value>` (one argument pair per query key; with a single key their order
//! is fixed) with the environment `CONTAINER_ID` and `CONTAINER_NAMESPACE` only, the read ends
//! of the task's stdout and stderr pipes as fds 3 and 4, and the write end of a pipe as fd 5
//! that it waits on: the driver closes it once ready, and only then does the shim create the
//! task. The shim keeps the write ends of the output pipes until the task is deleted, then
//! closes them and sends SIGTERM (SIGKILL 12 s later): the driver ignores SIGTERM and reads to
//! end of file, so nothing buffered in the pipes is lost. A task created this way has no stdin
//! (the shim connects none with a binary log), which is why containers with `stdin: true` keep
//! the agent-read FIFOs (see docs/containerd.md).
//!
//! The agent binary is the driver: `wasm-kubelet container-log <log path>` ([`main`]).

use std::ffi::OsString;
use std::fs::File;
use std::os::fd::{FromRawFd, OwnedFd};
use std::os::unix::ffi::OsStrExt;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use percent_encoding::{utf8_percent_encode, AsciiSet, NON_ALPHANUMERIC};

use crate::log::{ContainerLog, Stream};

/// The subcommand (the `binary://` query key) that runs the driver.
pub const SUBCOMMAND: &str = "container-log";

/// The descriptors containerd's shim passes the driver (its `ExtraFiles`, from fd 3 on).
const STDOUT_FD: i32 = 3;
const STDERR_FD: i32 = 4;
const READY_FD: i32 = 5;

/// What is left as is in a `binary://` URI's path: everything else is percent-encoded (Go's
/// `url.Parse` decodes it back).
const PATH_SET: &AsciiSet = &NON_ALPHANUMERIC
    .remove(b'/')
    .remove(b'-')
    .remove(b'_')
    .remove(b'.')
    .remove(b'~');
/// A query value: as the path, `/` encoded too.
const QUERY_SET: &AsciiSet = &PATH_SET.add(b'/');

#[derive(Debug, thiserror::Error)]
pub enum LogDriverError {
    #[error("usage: {SUBCOMMAND} <absolute path of the container's log>")]
    Usage,
    #[error("fd {0} is not open: this is run by containerd's shim as a `binary://` log driver")]
    NotFromShim(i32),
    #[error("opening the log {path}: {source}")]
    Open {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// The URI a task's stdout and stderr are created with so that the shim runs `program` as the
/// driver writing the log at `log`. `None` when a path is not UTF-8 (Go's URL parser would
/// not give it back).
pub fn uri(program: &Path, log: &Path) -> Option<String> {
    let program = program.to_str()?;
    let log = log.to_str()?;
    Some(format!(
        "binary://{}?{SUBCOMMAND}={}",
        utf8_percent_encode(program, PATH_SET),
        utf8_percent_encode(log, QUERY_SET)
    ))
}

/// Runs the driver with the arguments after the subcommand; the exit code.
pub fn main(args: &[OsString]) -> ExitCode {
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // The shim gives the driver /dev/null as stderr; this is for a human running it.
            eprintln!("wasm-kubelet {SUBCOMMAND}: {e}");
            ExitCode::FAILURE
        }
    }
}

/// Copies fds 3 and 4 into the log named by `args` until both end. If the log cannot be
/// opened the output is still read (and dropped), so the container is neither blocked nor
/// killed by SIGPIPE; the agent opened the same path before creating the task, so that is
/// only a race with someone removing the pod's log directory.
pub fn run(args: &[OsString]) -> Result<(), LogDriverError> {
    let [path] = args else {
        return Err(LogDriverError::Usage);
    };
    let path = PathBuf::from(path);
    if !path.is_absolute() || path.as_os_str().as_bytes().is_empty() {
        return Err(LogDriverError::Usage);
    }
    let stdout = take_fd(STDOUT_FD)?;
    let stderr = take_fd(STDERR_FD)?;
    let ready = take_fd(READY_FD)?;
    // SAFETY: setting a signal's disposition to SIG_IGN runs no code of ours in the handler.
    unsafe {
        libc::signal(libc::SIGTERM, libc::SIG_IGN);
    }
    let log = ContainerLog::open(&path);
    drop(ready);
    let log_for_stderr = log.as_ref().ok().cloned();
    let stderr_copy = std::thread::spawn(move || copy(log_for_stderr, Stream::Stderr, stderr));
    copy(log.as_ref().ok().cloned(), Stream::Stdout, stdout);
    let _ = stderr_copy.join();
    log.map(|_| ())
        .map_err(|source| LogDriverError::Open { path, source })
}

fn copy(log: Option<ContainerLog>, stream: Stream, source: File) {
    match log {
        Some(log) => log.copy_from(stream, source),
        None => {
            let _ = std::io::copy(&mut { source }, &mut std::io::sink());
        }
    }
}

/// Takes ownership of inherited descriptor `fd`, which must be open.
fn take_fd(fd: i32) -> Result<File, LogDriverError> {
    // SAFETY: F_GETFD only reads the descriptor's flags.
    if unsafe { libc::fcntl(fd, libc::F_GETFD) } < 0 {
        return Err(LogDriverError::NotFromShim(fd));
    }
    // SAFETY: the descriptor is open (checked above) and nothing else in this process owns it:
    // it was inherited from the shim for this driver alone, and each is taken once.
    let owned = unsafe { OwnedFd::from_raw_fd(fd) };
    let file = File::from(owned);
    set_cloexec(&file);
    Ok(file)
}

fn set_cloexec(file: &File) {
    use std::os::fd::AsRawFd;
    // SAFETY: fcntl on a descriptor `file` owns; no memory is passed.
    unsafe {
        libc::fcntl(file.as_raw_fd(), libc::F_SETFD, libc::FD_CLOEXEC);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn uri_encodes_what_a_url_cannot_hold() {
        assert_eq!(
            uri(
                Path::new("/usr/bin/wasm-kubelet"),
                Path::new("/var/log/pods/ns_a b_u?#%/c/0.log")
            )
            .unwrap(),
            "binary:///usr/bin/wasm-kubelet?container-log=%2Fvar%2Flog%2Fpods%2Fns_a%20b_u%3F%23%25%2Fc%2F0.log"
        );
    }

    #[test]
    fn refuses_a_relative_path_or_extra_arguments() {
        assert!(matches!(
            run(&["rel/0.log".into()]),
            Err(LogDriverError::Usage)
        ));
        assert!(matches!(
            run(&["/a.log".into(), "/b.log".into()]),
            Err(LogDriverError::Usage)
        ));
    }
}
