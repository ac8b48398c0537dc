//! Exec: a command run in a running container through containerd's task exec processes
//! (Tasks.Exec, Start, Wait, DeleteProcess), as `ctr task exec` does.
//!
//! The process spec is the container's own (`process` of its OCI spec: env, working dir,
//! user, capabilities, `noNewPrivileges`, rlimits) with `args` replaced by the command and no
//! terminal; runc runs it in the container's namespaces and cgroup, so it has exactly what the
//! container has. Its stdio are FIFOs of its own under the container's FIFO directory, copied
//! to and from the caller's [`ExecIo`], never to the container's log.
//!
//! Exit codes are the process's (128 + the signal when a signal ended it; a container that ends
//! under the exec ends it too, as its PID namespace does). A timeout SIGKILLs the exec process
//! and its process group (what it started, unless that left the group) and is
//! [`ProviderError::Timeout`].

use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::Duration;

use containerd_client::services::v1::{
    DeleteProcessRequest, ExecProcessRequest, KillRequest, StartRequest, WaitRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use provider_api::{ExecIo, ProviderError};
use tokio::io::{AsyncRead, AsyncWrite, AsyncWriteExt};
use tokio::net::unix::pipe;
use tokio::task::JoinHandle;

use crate::client::{is_not_found, status_error};
use crate::{mkfifo, random_id, stored_config, ContainerdProvider, KILL_WAIT};

/// The type URL containerd expects for an OCI process spec.
const PROCESS_TYPE_URL: &str = "types.containerd.io/opencontainers/runtime-spec/1/Process";

/// After the exec process has exited, how long its last output may take to reach the caller:
/// a background process it left holding its stdout, or a caller that stopped reading, must not
/// hold the exec forever.
const FLUSH_WAIT: Duration = Duration::from_secs(5);

impl ContainerdProvider {
    /// [`provider_api::Provider::exec`] for containerd (see the module docs).
    pub(crate) async fn exec_in(
        &self,
        id: &str,
        command: Vec<String>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        let container = self.get_container(id).await?;
        let name = stored_config(&container).map_or_else(|| id.to_string(), |c| c.name);
        let Some(program) = command.first().cloned() else {
            return Err(ProviderError::Exec(format!(
                "exec in container {name}: the command is empty"
            )));
        };
        let running = self
            .get_task(id)
            .await?
            .is_some_and(|t| t.status == TaskStatus::Running as i32);
        if !running {
            return Err(ProviderError::Exec(format!(
                "exec {program:?} in container {name}: the container is not running"
            )));
        }
        let spec = process_spec(
            container.spec.as_ref().map(|s| s.value.as_slice()),
            &command,
        )
        .map_err(|e| ProviderError::Exec(format!("exec in container {name}: {e}")))?;

        let exec_id = random_id();
        let dir = self.fifo_dir(id).join(format!("exec-{exec_id}"));
        let fifos = Fifos::make(&dir, io.stdin.is_some()).map_err(|e| {
            ProviderError::Io(format!("making the exec FIFOs in {}: {e}", dir.display()))
        })?;
        let result = self
            .run_exec(id, &name, &program, &exec_id, &fifos, spec, io)
            .await;
        let _ = std::fs::remove_dir_all(&dir);
        result
    }

    #[allow(clippy::too_many_arguments)]
    async fn run_exec(
        &self,
        id: &str,
        name: &str,
        program: &str,
        exec_id: &str,
        fifos: &Fifos,
        spec: Vec<u8>,
        io: ExecIo,
    ) -> Result<i32, ProviderError> {
        // The provider's end of stdin, read-write so it never blocks and nothing written is
        // lost before the shim opens its end.
        let stdin_writer = match &fifos.stdin {
            Some(path) => Some(
                pipe::OpenOptions::new()
                    .read_write(true)
                    .open_sender(path)
                    .map_err(|e| ProviderError::Io(format!("opening the exec's stdin: {e}")))?,
            ),
            None => None,
        };
        // Readers block in open until the shim opens the write ends, on Start.
        let stdout = copy_out(fifos.stdout.clone(), io.stdout);
        let stderr = copy_out(fifos.stderr.clone(), io.stderr);
        let path = |p: &Path| p.to_string_lossy().into_owned();
        let started = async {
            self.client
                .tasks()
                .exec(self.client.req(ExecProcessRequest {
                    container_id: id.to_string(),
                    stdin: fifos.stdin.as_deref().map(path).unwrap_or_default(),
                    stdout: path(&fifos.stdout),
                    stderr: path(&fifos.stderr),
                    terminal: false,
                    spec: Some(prost_types::Any {
                        type_url: PROCESS_TYPE_URL.into(),
                        value: spec,
                    }),
                    exec_id: exec_id.to_string(),
                }))
                .await
                .map_err(|e| exec_error(name, program, e))?;
            let started = self
                .client
                .tasks()
                .start(self.client.req(StartRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                }))
                .await
                .map_err(|e| exec_error(name, program, e))?;
            Ok::<u32, ProviderError>(started.into_inner().pid)
        }
        .await;
        let pid = match started {
            Ok(pid) => pid,
            Err(e) => {
                fifos.release();
                self.delete_process(id, exec_id).await;
                stdout.abort();
                stderr.abort();
                return Err(e);
            }
        };
        // The shim has opened its ends of stdin (on Start): copy the caller's into it, then close
        // the provider's end and the shim's (CloseIO), which is end of file for the command.
        let stdin = match (io.stdin, stdin_writer) {
            (Some(source), Some(writer)) => {
                let client = self.client.clone();
                let (id, exec_id) = (id.to_string(), exec_id.to_string());
                Some(tokio::spawn(async move {
                    copy_in(source, writer).await;
                    // The shim holds a write end of its own until CloseIO.
                    crate::attach::close_io(&client, &id, &exec_id).await;
                }))
            }
            _ => None,
        };

        let wait = async {
            self.client
                .tasks()
                .wait(self.client.req(WaitRequest {
                    container_id: id.to_string(),
                    exec_id: exec_id.to_string(),
                }))
                .await
        };
        let waited = match io.timeout {
            None => Some(wait.await),
            Some(limit) => tokio::time::timeout(limit, wait).await.ok(),
        };
        let Some(waited) = waited else {
            let limit = io.timeout.unwrap_or_default();
            tracing::debug!(
                id,
                exec_id,
                timeout_ms = limit.as_millis() as u64,
                "exec timed out; killing it"
            );
            self.kill_exec(id, exec_id, pid).await;
            for task in [Some(stdout), Some(stderr), stdin].into_iter().flatten() {
                task.abort();
            }
            return Err(ProviderError::Timeout(format!(
                "exec {program:?} in container {name} timed out after {limit:?}"
            )));
        };
        let code = match waited {
            Ok(reply) => reply.into_inner().exit_status as i32,
            Err(e) => {
                self.delete_process(id, exec_id).await;
                return Err(status_error(
                    &format!("waiting for exec {program:?} in container {name}"),
                    e,
                ));
            }
        };
        // Output is complete when the shim closes the FIFOs (every holder of the command's
        // stdout and stderr is gone); bounded, see FLUSH_WAIT.
        let (mut stdout, mut stderr) = (stdout, stderr);
        let flushed = async {
            let _ = (&mut stdout).await;
            let _ = (&mut stderr).await;
        };
        if tokio::time::timeout(FLUSH_WAIT, flushed).await.is_err() {
            tracing::debug!(
                id,
                exec_id,
                "exec output still open {FLUSH_WAIT:?} after its exit; dropping the rest"
            );
        }
        // Done with the caller's writers: a process the command left behind keeps its output
        // to itself.
        stdout.abort();
        stderr.abort();
        if let Some(stdin) = stdin {
            stdin.abort();
        }
        self.delete_process(id, exec_id).await;
        tracing::debug!(id, exec_id, exit_code = code, "exec ended");
        Ok(code)
    }

    /// SIGKILLs the exec process and its process group (runc makes an exec process the leader
    /// of a session of its own, so what it started goes with it unless it left the group),
    /// waits for its exit (at most [`KILL_WAIT`]) and deletes it. `pid` is its host PID.
    async fn kill_exec(&self, id: &str, exec_id: &str, pid: u32) {
        // PID 0 or 1 would name the agent's own group or every process: never signalled.
        if let Ok(pgid) = i32::try_from(pid) {
            if pgid > 1 {
                // SAFETY: kill(2) with a negative PID signals that process group; no memory is
                // passed. The exec had not exited when its timeout ran out, so `pid` is still
                // its (a PID is not reused while its process or group lives).
                unsafe { libc::kill(-pgid, libc::SIGKILL) };
            }
        }
        let killed = self
            .client
            .tasks()
            .kill(self.client.req(KillRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
                signal: libc::SIGKILL as u32,
                all: false,
            }))
            .await;
        if let Err(e) = killed {
            if !is_not_found(&e) {
                tracing::warn!(id, exec_id, error = %e.message(), "killing a timed-out exec failed");
            }
        }
        let mut tasks = self.client.tasks();
        let wait = tasks.wait(self.client.req(WaitRequest {
            container_id: id.to_string(),
            exec_id: exec_id.to_string(),
        }));
        let _ = tokio::time::timeout(KILL_WAIT, wait).await;
        self.delete_process(id, exec_id).await;
    }

    async fn delete_process(&self, id: &str, exec_id: &str) {
        let deleted = self
            .client
            .tasks()
            .delete_process(self.client.req(DeleteProcessRequest {
                container_id: id.to_string(),
                exec_id: exec_id.to_string(),
            }))
            .await;
        if let Err(e) = deleted {
            if !is_not_found(&e) {
                tracing::debug!(id, exec_id, error = %e.message(), "deleting an exec process failed");
            }
        }
    }
}

fn exec_error(name: &str, program: &str, e: containerd_client::tonic::Status) -> ProviderError {
    use containerd_client::tonic::Code;
    match e.code() {
        Code::Unavailable | Code::Cancelled | Code::DeadlineExceeded => {
            status_error(&format!("exec in container {name}"), e)
        }
        // The command cannot run (not found, not executable) or the container just ended.
        _ => ProviderError::Exec(format!(
            "exec {program:?} in container {name}: {}",
            e.message()
        )),
    }
}

/// The exec's process spec: the container's `process` with `args` = `command`, no terminal.
fn process_spec(container_spec: Option<&[u8]>, command: &[String]) -> Result<Vec<u8>, String> {
    let spec: serde_json::Value = serde_json::from_slice(container_spec.unwrap_or_default())
        .map_err(|e| format!("the container's stored spec is unreadable: {e}"))?;
    let mut process = spec
        .get("process")
        .cloned()
        .filter(|p| p.is_object())
        .ok_or("the container's stored spec has no process")?;
    process["args"] = serde_json::json!(command);
    process["terminal"] = serde_json::json!(false);
    if let Some(p) = process.as_object_mut() {
        p.remove("consoleSize");
    }
    serde_json::to_vec(&process).map_err(|e| e.to_string())
}

/// The FIFOs of one exec.
struct Fifos {
    stdin: Option<PathBuf>,
    stdout: PathBuf,
    stderr: PathBuf,
}

impl Fifos {
    fn make(dir: &Path, stdin: bool) -> std::io::Result<Self> {
        std::fs::create_dir_all(dir)?;
        let fifos = Fifos {
            stdin: stdin.then(|| dir.join("stdin")),
            stdout: dir.join("stdout"),
            stderr: dir.join("stderr"),
        };
        for path in [
            Some(&fifos.stdout),
            Some(&fifos.stderr),
            fifos.stdin.as_ref(),
        ]
        .into_iter()
        .flatten()
        {
            mkfifo(path)?;
        }
        Ok(fifos)
    }

    /// Ends the readers blocked in open when the shim never opened the FIFOs: a writer that
    /// opens and closes each gives them end of file.
    fn release(&self) {
        for path in [&self.stdout, &self.stderr] {
            let _ = std::fs::OpenOptions::new()
                .write(true)
                .custom_flags(libc::O_NONBLOCK)
                .open(path);
        }
    }
}

/// Copies the FIFO at `path` to `writer` until end of file; the open waits for the shim's.
fn copy_out(
    path: PathBuf,
    mut writer: std::pin::Pin<Box<dyn AsyncWrite + Send>>,
) -> JoinHandle<()> {
    tokio::spawn(async move {
        let opened = tokio::task::spawn_blocking(move || std::fs::File::open(&path)).await;
        let mut reader = match opened {
            Ok(Ok(file)) => match pipe::Receiver::from_file(file) {
                Ok(reader) => reader,
                Err(e) => {
                    tracing::debug!(error = %e, "reading an exec FIFO failed");
                    return;
                }
            },
            _ => return,
        };
        let _ = tokio::io::copy(&mut reader, &mut writer).await;
        let _ = writer.shutdown().await;
    })
}

/// Copies the caller's stdin into the exec's, then closes the provider's end.
async fn copy_in(mut source: std::pin::Pin<Box<dyn AsyncRead + Send>>, mut writer: pipe::Sender) {
    let _ = tokio::io::copy(&mut source, &mut writer).await;
    drop(writer);
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn process_spec_is_the_containers_with_the_command() {
        let spec = serde_json::json!({
            "ociVersion": "1.0.2",
            "process": {
                "terminal": true,
                "consoleSize": {"height": 1, "width": 1},
                "user": {"uid": 1000, "gid": 1000},
                "args": ["sleep", "1000"],
                "env": ["PATH=/bin", "A=b"],
                "cwd": "/work",
                "capabilities": {"bounding": ["CAP_KILL"]},
                "noNewPrivileges": true
            },
            "root": {"path": "rootfs"}
        });
        let command = vec!["sh".to_string(), "-c".to_string(), "id".to_string()];
        let got: serde_json::Value = serde_json::from_slice(
            &process_spec(Some(&serde_json::to_vec(&spec).unwrap()), &command).unwrap(),
        )
        .unwrap();
        let mut want = spec["process"].clone();
        want["args"] = serde_json::json!(command);
        want["terminal"] = serde_json::json!(false);
        want.as_object_mut().unwrap().remove("consoleSize");
        assert_eq!(got, want);
        assert!(process_spec(Some(b"{}"), &command).is_err());
        assert!(process_spec(None, &command).is_err());
    }
}
