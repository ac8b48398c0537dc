//! An exited container's status, kept in its containerd container record, and the deletion of
//! its task.
//!
//! A task that has exited keeps its shim (`containerd-shim-runc-v2`, several MiB) alive until
//! it is deleted. So, as containerd's CRI plugin does, the provider deletes the task once the
//! container has exited, after recording what the container's status needs (exit code, finish
//! time, whether the memory cgroup counted an OOM kill) as labels of the container record: they
//! survive an agent restart and need no store of the provider's own.
//!
//! Order: the labels are written first, then the task is deleted; an agent that dies between
//! the two finds the exited task at its next start (adoption, or the next listing) and deletes
//! it then, the labels already there being kept as they are. Tasks.Delete returns once the
//! shim has closed the task's output pipes and its log driver has exited (containerd 1.6
//! `pkg/process/io.go` `binaryIO.Close`: SIGTERM, which the driver ignores to read to end of
//! file, then a wait of up to 12 s), so the container's last output is in its log by then.
//! Reaps of one container are serialized (a lock per container ID), so two of them never read
//! the cgroup's OOM count after the other deleted the task (and the cgroup with it).

use std::collections::HashMap;
use std::path::Path;
use std::sync::{Arc, Mutex};
use std::time::SystemTime;

use containerd_client::services::v1::{
    Container, DeleteTaskRequest, GetContainerRequest, GetRequest as GetTaskRequest,
    UpdateContainerRequest,
};
use containerd_client::types::v1::Status as TaskStatus;
use provider_api::ProviderError;

use crate::client::{is_not_found, status_error, Client};
use crate::{nanos_since_epoch, time_from_proto, LABEL_EXIT_CODE, LABEL_FINISHED_AT, LABEL_OOM};

/// The exit code of a process ended by SIGKILL, as shells and the kubelet report it.
const SIGKILL_EXIT: u32 = 137;

/// Records exited containers' status and deletes their tasks (see the module's comment).
#[derive(Clone)]
pub(crate) struct Reaper {
    client: Client,
    /// Every container's cgroup is `<cgroup_parent>/<id>`.
    cgroup_parent: String,
    locks: Arc<Mutex<HashMap<String, Arc<tokio::sync::Mutex<()>>>>>,
}

/// What a reap did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Reaped {
    /// The container has no task or its task has not exited: nothing to do.
    Nothing,
    /// The exit was recorded (now or before) and the task deleted.
    Deleted { exit_code: u32, oom: bool },
}

impl Reaper {
    pub(crate) fn new(client: Client, cgroup_parent: &str) -> Self {
        Self {
            client,
            cgroup_parent: cgroup_parent.trim_end_matches('/').to_string(),
            locks: Arc::default(),
        }
    }

    /// If the container's task has exited: records its exit in the container record (unless
    /// recorded already) and then deletes the task.
    pub(crate) async fn reap(&self, id: &str) -> Result<Reaped, ProviderError> {
        let lock = self
            .locks
            .lock()
            .unwrap_or_else(|e| e.into_inner())
            .entry(id.to_string())
            .or_default()
            .clone();
        let result = {
            let _held = lock.lock().await;
            self.reap_locked(id).await
        };
        let mut locks = self.locks.lock().unwrap_or_else(|e| e.into_inner());
        // Ours and the map's: nobody else waits on it.
        if Arc::strong_count(&lock) == 2 {
            locks.remove(id);
        }
        result
    }

    async fn reap_locked(&self, id: &str) -> Result<Reaped, ProviderError> {
        let container = match self
            .client
            .containers()
            .get(self.client.req(GetContainerRequest { id: id.to_string() }))
            .await
        {
            Ok(reply) => match reply.into_inner().container {
                Some(c) => c,
                None => return Ok(Reaped::Nothing),
            },
            Err(e) if is_not_found(&e) => return Ok(Reaped::Nothing),
            Err(e) => return Err(status_error(&format!("container {id}"), e)),
        };
        let task = match self
            .client
            .tasks()
            .get(self.client.req(GetTaskRequest {
                container_id: id.to_string(),
                exec_id: String::new(),
            }))
            .await
        {
            Ok(reply) => reply.into_inner().process,
            Err(e) if is_not_found(&e) => None,
            Err(e) => return Err(status_error(&format!("task of container {id}"), e)),
        };
        let Some(task) = task else {
            return Ok(Reaped::Nothing);
        };
        if task.status != TaskStatus::Stopped as i32 {
            return Ok(Reaped::Nothing);
        }
        let (exit_code, oom) = match recorded_exit(&container) {
            Some(recorded) => recorded,
            None => {
                let oom = match container.labels.get(LABEL_OOM) {
                    Some(v) => v == "true",
                    // Read while the task, and so the cgroup, still exists.
                    None => task.exit_status == SIGKILL_EXIT && self.oom_in_cgroup(id),
                };
                let finished_at = task
                    .exited_at
                    .as_ref()
                    .map_or_else(SystemTime::now, time_from_proto);
                self.record(id, task.exit_status, finished_at, oom).await?;
                (task.exit_status, oom)
            }
        };
        delete_task(&self.client, id).await?;
        tracing::debug!(id, exit_code, oom, "exit recorded, task deleted");
        Ok(Reaped::Deleted { exit_code, oom })
    }

    async fn record(
        &self,
        id: &str,
        exit_code: u32,
        finished_at: SystemTime,
        oom: bool,
    ) -> Result<(), ProviderError> {
        let labels = HashMap::from([
            (LABEL_EXIT_CODE.to_string(), exit_code.to_string()),
            (
                LABEL_FINISHED_AT.to_string(),
                nanos_since_epoch(finished_at).to_string(),
            ),
            (LABEL_OOM.to_string(), oom.to_string()),
        ]);
        let paths = labels.keys().map(|k| format!("labels.{k}")).collect();
        self.client
            .containers()
            .update(self.client.req(UpdateContainerRequest {
                container: Some(Container {
                    id: id.to_string(),
                    labels,
                    ..Default::default()
                }),
                update_mask: Some(prost_types::FieldMask { paths }),
            }))
            .await
            .map_err(|e| status_error(&format!("recording the exit of container {id}"), e))?;
        Ok(())
    }

    /// Whether the container's memory cgroup counted an OOM kill (cgroup v1
    /// `memory.oom_control`, v2 `memory.events`); the cgroup lives until the task is deleted.
    pub(crate) fn oom_in_cgroup(&self, id: &str) -> bool {
        let rel = format!("{}/{id}", self.cgroup_parent);
        let rel = rel.trim_start_matches('/');
        [
            Path::new("/sys/fs/cgroup/memory")
                .join(rel)
                .join("memory.oom_control"),
            Path::new("/sys/fs/cgroup").join(rel).join("memory.events"),
        ]
        .iter()
        .any(|file| std::fs::read_to_string(file).is_ok_and(|text| oom_kills(&text) > 0))
    }
}

/// The `oom_kill` count of a `memory.oom_control` or `memory.events` file's text.
fn oom_kills(text: &str) -> u64 {
    text.lines()
        .find_map(|l| l.strip_prefix("oom_kill ")?.trim().parse().ok())
        .unwrap_or(0)
}

/// The exit code and OOM mark recorded in the container record, if its exit was recorded.
pub(crate) fn recorded_exit(container: &Container) -> Option<(u32, bool)> {
    let code = container.labels.get(LABEL_EXIT_CODE)?.parse().ok()?;
    let oom = container.labels.get(LABEL_OOM).is_some_and(|v| v == "true");
    Some((code, oom))
}

/// Deletes the container's task (its shim exits with it); a task already gone is no error.
pub(crate) async fn delete_task(client: &Client, id: &str) -> Result<(), ProviderError> {
    match client
        .tasks()
        .delete(client.req(DeleteTaskRequest {
            container_id: id.to_string(),
        }))
        .await
    {
        Ok(_) => Ok(()),
        Err(e) if is_not_found(&e) => Ok(()),
        Err(e) => Err(status_error(&format!("deleting the task of {id}"), e)),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn oom_kill_counts_of_v1_and_v2_files() {
        let v1 = "oom_kill_disable 0\nunder_oom 0\noom_kill 2\n";
        let v2 = "low 0\nhigh 0\nmax 5\noom 1\noom_kill 1\n";
        assert_eq!(oom_kills(v1), 2);
        assert_eq!(oom_kills(v2), 1);
        assert_eq!(
            oom_kills("oom_kill_disable 0\nunder_oom 0\noom_kill 0\n"),
            0
        );
        assert_eq!(oom_kills(""), 0);
    }

    #[test]
    fn an_exit_is_recorded_only_with_a_code() {
        let mut c = Container::default();
        assert_eq!(recorded_exit(&c), None);
        c.labels.insert(LABEL_OOM.into(), "true".into());
        assert_eq!(recorded_exit(&c), None);
        c.labels.insert(LABEL_EXIT_CODE.into(), "137".into());
        assert_eq!(recorded_exit(&c), Some((137, true)));
        c.labels.insert(LABEL_EXIT_CODE.into(), "x".into());
        assert_eq!(recorded_exit(&c), None);
    }
}
